"""Measurement (lessons 02 to 07 and the benchmark suite): timing, the machine's limits, what dispatchers cost,
proofs of equality with the single-device layer, benchmarks, committed records and figures.

    timing.py            medians of repeated runs, the slowest rank's time                  lesson 02
    limits.py            floors, all-to-all bandwidth and latency, in the same run          lessons 02-03
    dispatcher_costs.py  bytes moved and step time of each dispatcher                       lessons 02-03
    equivalence.py       EP (TP, EP x DP) == the single-device layer                        lesson 02
    figures.py           committed figures and source in a notebook; headless runs          lesson 01
    progress.py          progress that reads as progress, live or headless                  lesson 01
    bench_experts.py     the expert banks next to a dense GEMM                              lesson 04
    group_sizes.py       the grouped GEMMs on the same rows in groups of other sizes        lesson 04
    graph_times.py       what one CUDA graph per step buys                                  lesson 05
    load_imbalance.py    the busiest rank sets the step time                                lesson 06
    comm_model.py        EP and TP bytes, the formulas                                      lesson 07
    ep_vs_tp.py          EP against TP, counted and timed                                   lesson 07
    shapes.py, bench.py, profile.py   the benchmark suite                                   all
    records.py, torchrun.py           a record's header; starting a measurement          all
"""
