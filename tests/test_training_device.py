"""Training and evaluation on a device: the device policy at the edge of `train`/`eval`, mixed precision, checkpoints
that load on any device, and the training step's throughput figure. CUDA tests skip where there is no GPU."""

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from patchwatch.cli import main
from segmenters.device import DeviceError, native_bf16
from segmenters.training import TrainConfig, TrainSetupError, resolve_amp, train, training_throughput
from segmenters.twin import atomic_save, load_twin, read_checkpoint

TINY = dict(size=(48, 48), train_length=16, val_length=8, batch_size=8, threads=2, eval_every=1, compile=False)
TINY_FLAGS = ["--size", "48x48", "--train-length", "16", "--val-length", "8", "--batch-size", "8", "--threads", "2",
              "--no-compile", "--quiet"]
no_cuda_here = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def _tensor_devices(value) -> set[str]:
    """Every device a tensor nested in `value` lives on."""
    if isinstance(value, torch.Tensor):
        return {value.device.type}
    if isinstance(value, dict):
        return set().union(*(_tensor_devices(v) for v in value.values()))
    if isinstance(value, (list, tuple)):
        return set().union(*(_tensor_devices(v) for v in value))
    return set()


def test_amp_auto_is_off_on_the_cpu_and_bad_modes_are_named():
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) == "off"
    assert resolve_amp("bf16", cpu) == "bf16" and resolve_amp("off", cpu) == "off"
    with pytest.raises(TrainSetupError, match="'fp8'"):
        resolve_amp("fp8", cpu)


def test_bf16_on_a_cpu_without_bf16_hardware_runs_with_a_warning(capsys):
    cpu = torch.device("cpu")
    hardware = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert native_bf16(cpu) == hardware
    assert resolve_amp("bf16", cpu) == "bf16"
    warned = "bf16 autocast is emulated" in capsys.readouterr().err
    assert warned == (not hardware)
    resolve_amp("off", cpu)
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_cli_train_on_explicit_cpu_records_the_device_everywhere(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", *TINY_FLAGS, "--epochs", "1", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["device"], summary["amp"], summary["workers"]) == ("cpu", "off", 0)
    assert json.loads((out / "summary.json").read_text())["device"] == "cpu"
    assert [(h["device"], h["amp"]) for h in json.loads((out / "history.json").read_text())] == [("cpu", "off")]
    assert yaml.safe_load((out / "config.yaml").read_text())["device"] == "cpu"
    twin = load_twin(out / "last.pt")
    assert (twin.spec.training["device"], twin.spec.training["amp"]) == ("cpu", "off")
    result = CliRunner().invoke(main, ["eval", str(out / "last.pt"), "--device", "cpu", "--length", "4",
                                       "--overlays", "1", "--out", str(tmp_path / "ev"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "ev" / "report.json").read_text())["device"] == "cpu"


@no_cuda_here
@pytest.mark.slow
def test_auto_resolves_to_the_cpu_without_cuda(tmp_path):
    summary = train(TrainConfig(epochs=1, out=str(tmp_path), **TINY), progress=False)
    assert (summary["device"], summary["amp"], summary["workers"]) == ("cpu", "off", 0)


@no_cuda_here
def test_asking_for_cuda_without_one_fails_before_any_work(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", *TINY_FLAGS, "--device", "cuda", "--out", str(out)])
    assert result.exit_code != 0 and "'cuda'" in result.output and "Traceback" not in result.output
    assert not out.exists(), "nothing may be written for a device this machine lacks"
    with pytest.raises(DeviceError, match="'cuda:1'"):
        train(TrainConfig(device="cuda:1", out=str(out), **TINY), progress=False)
    assert not out.exists()
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"unread")
    result = CliRunner().invoke(main, ["eval", str(junk), "--device", "cuda"])
    assert result.exit_code != 0 and "'cuda'" in result.output


def test_an_unknown_device_is_named(tmp_path):
    result = CliRunner().invoke(main, ["train", "--device", "gpu0", "--out", str(tmp_path / "run")])
    assert result.exit_code != 0 and "'gpu0'" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_yaml_config_names_the_device_and_precision(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"device": "cpu", "amp": "bf16", "workers": 1, "epochs": 1, "size": [48, 48],
                                      "train_length": 16, "val_length": 8, "batch_size": 8, "compile": False,
                                      "out": str(tmp_path / "run")}))
    result = CliRunner().invoke(main, ["train", "--config", str(config), "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # the summary alone on stdout; a bf16 warning goes to stderr
    assert (summary["device"], summary["amp"], summary["workers"]) == ("cpu", "bf16", 1)
    assert ("bf16 autocast is emulated" in result.stderr) == (not native_bf16(torch.device("cpu")))
    config.write_text(yaml.safe_dump({"amp": "fp8"}))
    result = CliRunner().invoke(main, ["train", "--config", str(config)])
    assert result.exit_code != 0 and "amp" in result.output


@pytest.mark.slow
def test_resume_with_another_precision_continues_the_run(tmp_path):
    config = dict(TINY, out=str(tmp_path))
    train(TrainConfig(epochs=1, amp="off", **config), progress=False)
    assert read_checkpoint(tmp_path / "last.pt")["grad_scaler"] is None
    train(TrainConfig(epochs=2, amp="fp16", **config), resume=True, progress=False)
    checkpoint = read_checkpoint(tmp_path / "last.pt")
    assert checkpoint["grad_scaler"]["scale"] > 0, "fp16 keeps its grad scaler's state in the checkpoint"
    # A scale no fresh scaler starts from (65536, halved on overflow): resuming in fp16 must continue from it.
    checkpoint["grad_scaler"]["scale"] = 1024.0
    atomic_save(checkpoint, tmp_path / "last.pt")
    train(TrainConfig(epochs=3, amp="fp16", **config), resume=True, progress=False)
    assert read_checkpoint(tmp_path / "last.pt")["grad_scaler"]["scale"] in (1024.0, 512.0, 256.0)
    summary = train(TrainConfig(epochs=4, amp="bf16", **config), resume=True, progress=False)
    checkpoint = read_checkpoint(tmp_path / "last.pt")
    assert summary["steps"] == 8 and checkpoint["step"] == 8 and checkpoint["grad_scaler"] is None
    assert [h["amp"] for h in checkpoint["history"]] == ["off", "fp16", "fp16", "bf16"]
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())


@pytest.mark.slow
def test_checkpoints_hold_only_cpu_tensors_and_load_into_a_fresh_run(tmp_path):
    train(TrainConfig(epochs=1, loss="semeda", semeda_pretrain_batches=3, amp="fp16", out=str(tmp_path), **TINY),
          progress=False)
    checkpoint = read_checkpoint(tmp_path / "last.pt")
    assert _tensor_devices(checkpoint) == {"cpu"}
    assert checkpoint["semeda_net"] and checkpoint["optimizer"]["state"]
    twin = load_twin(tmp_path / "last.pt", map_location="cpu")  # the weights match their recorded digest
    assert twin.spec.training["amp"] == "fp16"
    optimizer = torch.optim.AdamW(twin.model.parameters())
    optimizer.load_state_dict(checkpoint["optimizer"])
    saved = checkpoint["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], saved)


def test_training_throughput_times_the_training_step_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    figure = training_throughput("unet", (32, 32), 2, "cpu", steps=2, warmup=1, classes=4, compile=False)
    assert figure["img_per_s"] > 0 and figure["steps"] == 2 and figure["batch_size"] == 2
    assert (figure["device"], figure["amp"], figure["size"]) == ("cpu", "off", [32, 32])
    assert figure["compile"] == {"model": False, "loss": False}
    semeda = training_throughput("unet", (32, 32), 2, "cpu", amp="bf16", steps=1, warmup=0, classes=4,
                                 loss="semeda", compile=False, lambdas=(0.5, 0.5, 0.5))
    assert semeda["amp"] == "bf16" and semeda["loss"] == "semeda" and semeda["lambdas"] == [0.5, 0.5, 0.5]
    assert figure["lambdas"] == []
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="steps >= 1"):
        training_throughput("unet", (32, 32), 2, "cpu", steps=0)


@no_cuda_here
def test_training_throughput_refuses_cuda_where_there_is_none():
    with pytest.raises(DeviceError, match="'cuda'"):
        training_throughput("unet", (32, 32), 2, "cuda")


def _cuda_amp_modes() -> list[str]:
    has_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return ["bf16", "fp16"] if has_bf16 else ["fp16"]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_with_amp_resumes_on_the_cpu(tmp_path, amp):
    if amp not in _cuda_amp_modes():
        pytest.skip(f"this GPU has no {amp}")
    config = dict(TINY, out=str(tmp_path), workers=2)
    summary = train(TrainConfig(epochs=1, device="cuda", amp=amp, loss="semeda", semeda_pretrain_batches=3, **config),
                    progress=False)
    assert summary["device"].startswith("cuda:0") and summary["amp"] == amp and summary["workers"] == 2
    checkpoint = read_checkpoint(tmp_path / "last.pt")
    assert _tensor_devices(checkpoint) == {"cpu"}
    assert (checkpoint["grad_scaler"] is not None) == (amp == "fp16")
    summary = train(TrainConfig(epochs=2, device="cpu", amp="off", loss="semeda", **config), resume=True,
                    progress=False)
    history = read_checkpoint(tmp_path / "last.pt")["history"]
    assert summary["steps"] == 4 and [h["device"] for h in history] == ["cuda:0", "cpu"]
    assert all(h["val_miou"] is not None for h in history)


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_checkpoint_resumes_and_evaluates_on_cuda(tmp_path):
    config = dict(TINY, out=str(tmp_path))
    train(TrainConfig(epochs=1, device="cpu", **config), progress=False)
    summary = train(TrainConfig(epochs=2, device="cuda", amp="auto", **config), resume=True, progress=False)
    assert summary["device"].startswith("cuda") and summary["steps"] == 4
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "last.pt"), "--device", "cuda", "--length", "4",
                                       "--overlays", "1", "--out", str(tmp_path / "ev"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "ev" / "report.json").read_text())["device"].startswith("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_throughput_on_cuda():
    for amp in _cuda_amp_modes():
        figure = training_throughput("unet", (64, 64), 4, "cuda", amp=amp, steps=3, warmup=1, compile=False)
        assert figure["device"].startswith("cuda") and figure["amp"] == amp and figure["img_per_s"] > 0
