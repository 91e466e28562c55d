"""The encoder's precision on this machine: the card's, unless it is bf16 where bf16 is not native."""

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dicom_node.config import load_config
from dicom_node.jobs import JobService
from inference.model.builtin import BuiltinModel
from inference.model.loading import ModelCache
from inference.model.precision import encoder_bf16, native_bf16

from tests.conftest import TEST_PEERS, tiny_card
from tests.localpeers import free_port, write_node_config


def _cpu_has_bf16(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)


@pytest.mark.parametrize("native", [True, False])
def test_auto_runs_a_bf16_card_in_fp32_only_where_bf16_is_not_native(tmp_path, monkeypatch, native):
    """A bf16 model on a CPU without native bf16 (AVX2 only) would run its encoder about 6x slower than in
    fp32, so the node's "auto" runs it in fp32 there and keeps the card's bf16 elsewhere; "card" always keeps it."""
    _cpu_has_bf16(monkeypatch, native)
    BuiltinModel.new(tiny_card(encoder_precision="bf16")).save(tmp_path / "bf16")
    BuiltinModel.new(tiny_card(encoder_precision="fp32")).save(tmp_path / "fp32")

    auto = ModelCache("cpu", "auto").get(tmp_path / "bf16")
    assert auto.bf16 is native
    assert next(auto.network.image_encoder.parameters()).dtype == (torch.bfloat16 if native else torch.float32)
    assert ModelCache("cpu", "card").get(tmp_path / "bf16").bf16 is True
    assert ModelCache("cpu", "auto").get(tmp_path / "fp32").bf16 is False  # auto never moves fp32 to bf16
    assert BuiltinModel.load(tmp_path / "fp32", precision="bf16").bf16 is True
    with pytest.raises(ValueError, match="encoder precision must be one of auto, card, bf16, fp32, not 'fp16'"):
        BuiltinModel.load(tmp_path / "fp32", precision="fp16")


def test_a_gpu_before_ampere_counts_as_emulating_bf16(monkeypatch):
    """bf16 is native from compute capability 8.0; the GPU asked about is the configured one (cuda:1)."""
    capability = {0: (9, 0), 1: (7, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability[device.index])
    assert native_bf16(torch.device("cuda:0")) and not native_bf16(torch.device("cuda:1"))
    assert encoder_bf16("bf16", "auto", torch.device("cuda:0")) is True
    assert encoder_bf16("bf16", "auto", torch.device("cuda:1")) is False
    assert encoder_bf16("bf16", "card", torch.device("cuda:1")) is True


def test_the_node_loads_models_in_the_configured_precision(tmp_path, monkeypatch):
    """``[jobs] encoder_precision`` reaches the models the node's jobs load."""
    _cpu_has_bf16(monkeypatch, False)
    BuiltinModel.new(tiny_card(encoder_precision="bf16")).save(tmp_path / "bf16")
    for choice, bf16 in (("auto", False), ("card", True)):
        extra = f'\n[jobs]\nencoder_precision = "{choice}"\n'
        config = load_config(write_node_config(tmp_path / choice, free_port(), TEST_PEERS, extra=extra))
        service = JobService(config)
        assert service.models.get(tmp_path / "bf16").bf16 is bf16
        service.engine.dispose()


def test_compile_encoder_compiles_an_fp32_cpu_encoder_while_the_model_loads(tmp_path, monkeypatch):
    """``[jobs] compile_encoder = true``: an fp32 model's encoder goes through torch.compile and runs once
    while the node loads it (the first series does not pay the minute of compiling); a bf16 encoder stays
    eager, and without the key nothing is compiled. torch.compile is stood in for by a recorder that runs the
    module as it is: what is tested is the wiring, not torch's compiler."""
    _cpu_has_bf16(monkeypatch, True)
    calls = []

    def recording(module):  # type: ignore[no-untyped-def]
        def run(x):  # type: ignore[no-untyped-def]
            calls.append(tuple(x.shape))
            return module(x)
        return run

    monkeypatch.setattr(torch, "compile", recording)
    BuiltinModel.new(tiny_card(encoder_precision="fp32")).save(tmp_path / "fp32")
    BuiltinModel.new(tiny_card(encoder_precision="bf16")).save(tmp_path / "bf16")
    for extra, compiled in (("\n[jobs]\ndevice = \"cpu\"\n", False), ("\n[jobs]\ndevice = \"cpu\"\ncompile_encoder = true\n", True)):
        config = load_config(write_node_config(tmp_path / str(compiled), free_port(), TEST_PEERS, extra=extra))
        service = JobService(config)
        model = service.models.get(tmp_path / "fp32")
        assert (model._compiled is not None, len(calls)) == (compiled, int(compiled))  # warmed up at load
        assert service.models.get(tmp_path / "bf16")._compiled is None
        service.engine.dispose()
    assert calls == [(1, 3, 256, 256)]


def test_job_threads_take_turns_with_the_compiled_encoder(monkeypatch):
    """torch.compile's Dynamo is not thread-safe and a node's job threads share one model: three series
    encoded at once go through the compiled encoder one after the other (a stand-in for the compiled
    module records how many threads are inside it)."""
    inside, most = [], []

    def compiled(module):  # type: ignore[no-untyped-def]
        def run(x):  # type: ignore[no-untyped-def]
            inside.append(1)
            most.append(len(inside))
            time.sleep(0.2)
            inside.pop()
            return torch.zeros(1, 256, 64, 64)
        return run

    monkeypatch.setattr(torch, "compile", compiled)
    model = BuiltinModel.new(tiny_card(encoder_precision="fp32"), device=torch.device("cpu"))
    model.compile_encoder()
    threads = [threading.Thread(target=model.encode, args=(np.zeros((2, 256, 256), np.float32),)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(most) == 6 and max(most) == 1


def test_a_slow_model_load_holds_up_only_the_callers_of_that_model(monkeypatch, tmp_path):
    """Loading a model can take a minute (compiling its encoder): the jobs that need it wait for that one
    load, while a job whose route uses another model gets it at once."""
    from inference.model import loading

    started, release, loads = threading.Event(), threading.Event(), []

    def load(path, *args):  # type: ignore[no-untyped-def]
        loads.append(path.name)
        if path.name == "slow":
            started.set()
            assert release.wait(10)
        return SimpleNamespace(version=path.name)

    monkeypatch.setattr(loading, "load_model", load)
    cache, got = ModelCache("cpu"), {}
    waiting = [threading.Thread(target=lambda k=k: got.setdefault(k, cache.get(tmp_path / "slow"))) for k in range(2)]
    for thread in waiting:
        thread.start()
    try:
        assert started.wait(10)
        other = threading.Thread(target=lambda: got.setdefault("other", cache.get(tmp_path / "fast")))
        other.start()
        other.join(5)
        assert got.get("other") is not None and got["other"].version == "fast"  # not held up by the slow load
        assert 0 not in got and 1 not in got
    finally:
        release.set()
        for thread in waiting:
            thread.join(10)
    assert got[0] is got[1] and sorted(loads) == ["fast", "slow"]  # the slow model was loaded once
