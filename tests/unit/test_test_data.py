"""The data the tests ship."""



from conftest import ROOT


def test_shipped_test_data_has_its_licences():
    data = ROOT / "tests" / "data"
    assert (data / "gsm8k" / "LICENSE").read_text().startswith("MIT License")
    assert (data / "tinyshakespeare" / "LICENSE").is_file() and (data / "README.md").is_file()
    assert sum(p.stat().st_size for p in data.rglob("*") if p.is_file()) < 1_100_000
