import pytest

from configurator import UserError, configure

DEFAULTS = dict(learning_rate=1e-5, batch_size=2, compile=False, out_dir="out", val_files=None,
                prompt_format=None, train_files="data/train.parquet", betas=(0.9, 0.95))


def run(argv, **extra):
    g = dict(DEFAULTS, **extra)
    configure(g, argv)
    return g


def test_plain_overrides():
    g = run(["--batch_size=8", "--learning_rate=3e-4", "--compile=True", "--out_dir=runs/a"])
    assert (g["batch_size"], g["learning_rate"], g["compile"], g["out_dir"]) == (
        8,
        3e-4,
        True,
        "runs/a")


def test_split_on_first_equals_only():
    assert run(["--prompt_format=Q={prompt} A="])["prompt_format"] == "Q={prompt} A="


def test_int_may_override_float():
    g = run(["--learning_rate=1"])
    assert g["learning_rate"] == 1.0 and isinstance(g["learning_rate"], float)


def test_none_default_accepts_anything():
    assert run(["--val_files=['a.parquet', 'b.parquet']"])["val_files"] == [
        "a.parquet",
        "b.parquet"]
    assert run(["--val_files=5"])["val_files"] == 5


@pytest.mark.parametrize(
    "text,value", [("True", True), ("False", False), ("true", True), ("false", False)])
def test_bools_parse(text, value):
    assert run([f"--compile={text}"])["compile"] is value


def test_str_key_keeps_text_as_written():
    assert run(["--out_dir=007"])["out_dir"] == "007"
    assert run(["--train_files=None"])["train_files"] is None
    assert run(["--train_files=['a.parquet','b.parquet']"])["train_files"] == [
        "a.parquet",
        "b.parquet"]


def test_unknown_key_lists_closest():
    with pytest.raises(UserError, match="unknown config key 'learning_rat'.*learning_rate"):
        run(["--learning_rat=1e-4"])


@pytest.mark.parametrize("arg,expected", [("--batch_size=2.5", "expected int, got 2.5"),
                                          ("--compile=1", "expected bool, got 1"),
                                          ("--learning_rate=fast", "expected float, got 'fast'"),
                                          ("--batch_size=True", "expected int, got True")])
def test_type_mismatch_names_key_type_and_value(arg, expected):
    with pytest.raises(UserError, match=f"--{arg[2:].split('=')[0]}: {expected}"):
        run([arg])


def test_missing_equals():
    with pytest.raises(UserError, match="--key=value"):
        run(["--compile"])


def test_config_file_then_overrides(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("_gpus = 4\nbatch_size = 16 // _gpus\nlearning_rate = 2e-5\n")
    g = run([str(cfg), "--learning_rate=1e-4"])
    assert (g["batch_size"], g["learning_rate"]) == (4, 1e-4)


def test_config_file_unknown_key(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("batch_sise = 4\n")
    with pytest.raises(
        UserError, match=r"c.py sets unknown key 'batch_sise' \(did you mean batch_size"):
        run([str(cfg)])


def test_missing_config_file():
    with pytest.raises(UserError, match="config file 'nope.py' not found"):
        run(["nope.py"])


def test_prints_only_on_rank_zero(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    run(["--batch_size=3"])
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    run(["--batch_size=3"])
    assert "batch_size = 3" in capsys.readouterr().out
