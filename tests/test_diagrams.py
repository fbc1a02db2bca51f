import importlib.util

from launcher.run import REPO


def test_diagrams_regenerate(tmp_path):
    spec = importlib.util.spec_from_file_location("make_diagrams", REPO / "images" / "make_diagrams.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    paths = mod.main(["--out", str(tmp_path)])
    assert [p.name for p in paths] == ["moe_layer.png", "ep_token_flow.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
        assert (REPO / "images" / p.name).is_file(), "the committed copy exists"
