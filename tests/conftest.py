"""Shared fixtures: a node on a free loopback port, real DICOM files, and the DCMTK clients."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import joinedload

from dicom_node.config import NodeConfig, load_config
from dicom_node.scp import Node
from storage.files import LOCK_FOLDER
from storage.models import Instance, Series, Study
from tests.localpeers import free_port, write_node_config

DCMTK_TOOLS = ("echoscu", "storescu", "findscu")

# Peers every test node trusts; "ECHOONLY" may only verify, "ELSEWHERE" may only connect from 127.0.0.2.
TEST_PEERS = [
    {"ae_title": "STORESCU", "host": "127.0.0.1", "allow": ["echo", "store", "find"]},
    {"ae_title": "FINDSCU", "host": "127.0.0.1", "allow": ["echo", "find"]},
    {"ae_title": "ECHOSCU", "allow": ["echo"]},
    {"ae_title": "ECHOONLY", "allow": ["echo"]},
    {"ae_title": "ELSEWHERE", "host": "127.0.0.2", "allow": ["echo", "store", "find"]},
]


@pytest.fixture(scope="session", autouse=True)
def dcmtk() -> None:
    """The tests drive the node with real DCMTK clients; `make test` installs them (apt-get install dcmtk)."""
    missing = [tool for tool in DCMTK_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"DCMTK tools missing: {', '.join(missing)} (run `make test`, which installs dcmtk)")


@dataclass
class RunningNode:
    node: Node
    config: NodeConfig
    port: int
    folder: Path

    def instances(self) -> list[Instance]:
        """Every indexed instance, with its series, study and patient loaded."""
        with self.node.sessions() as session:
            stmt = select(Instance).options(joinedload(Instance.series).joinedload(Series.study).joinedload(Study.patient))
            return list(session.scalars(stmt))

    def stored_files(self) -> set[Path]:
        return set(self.config.storage.path.glob("*/*/*.dcm"))

    def stray_files(self) -> list[Path]:
        """Anything in the store that is not an indexed, complete instance file."""
        indexed = {self.config.storage.path / i.path for i in self.instances()}
        locks = self.config.storage.path / LOCK_FOLDER  # the store's advisory locks, reused, never instances
        everything = {p for p in self.config.storage.path.rglob("*")
                      if p.is_file() and not p.name.startswith("index.sqlite") and p.parent != locks}
        return sorted(everything - indexed)


@pytest.fixture
def running_node(tmp_path: Path) -> Iterator[RunningNode]:
    port = free_port()
    config = load_config(write_node_config(tmp_path, port, TEST_PEERS))
    node = Node(config)
    node.start()
    try:
        yield RunningNode(node, config, port, tmp_path)
    finally:
        node.stop()


@pytest.fixture(scope="session")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A small synthetic CT series (20 slices of 512x512) written with pydicom."""
    from benchmarks.ct_series import write_ct_series

    return write_ct_series(tmp_path_factory.mktemp("ct"), slices=20, seed=1)


TINY = {"hidden_size": 64, "layers": 2, "heads": 2, "max_new_tokens": 24}


def tiny_card(**changes):
    from inference.model.card import ModelCard

    return ModelCard(**{"name": "tiny", "version": "0.0.1-test", "architecture": TINY, "modalities": ("CT", "MR"),
                        "encoder_precision": "fp32"} | changes)


def decoder_checkpoint(model, folder, **changes):  # type: ignore[no-untyped-def]
    """A taught toy saved as a decoder-decided checkpoint (its weights untouched; the card says how it
    decides: the [SEG] query's mask, 30 model-grid pixels), with ``changes`` to its card."""
    model.save(folder)
    card = json.loads((folder / "model_card.json").read_text())
    card["architecture"] |= {"decision": "decoder", "min_mask_pixels": 30}
    (folder / "model_card.json").write_text(json.dumps(card | changes))
    return folder


def _question() -> str:
    from inference.model.protocol import recognition_question

    return recognition_question("CT")


QUESTION = _question()
TOY_ANSWERS = ["It is [SEG]. Lung nodule. It is [SEG]. Kidney tumor.", "No findings."]  # the toy's two slices


@pytest.fixture(scope="session")
def trained():
    """A tiny model taught two slices: one with two findings, one with none (``_teach``)."""
    return _teach(tiny_card())


@pytest.fixture(scope="session")
def trained_presence():
    """As ``trained``, with the decoder's IoU head taught presence (GroundedConfig.presence)."""
    return _teach(tiny_card(architecture=TINY | {"presence": True}))


@pytest.fixture(scope="session")
def trained_detail():
    """As ``trained``, for a decoder-decided model with a detail branch that sees one neighbour each side
    (2.5D): the two slices are taught as the volume [finding, clear], each between its neighbours as the
    engine passes them (the edge slice repeated). Returns ``_teach``'s tuple plus those stacks."""
    import numpy as np

    from inference.model.detail import context_indices

    architecture = TINY | {"decision": "decoder", "region_tokens": True, "min_mask_pixels": 5, "detail_width": 8,
                           "context_slices": 1}
    volume = _images()
    stacks = np.stack([volume[context_indices(k, 2, 1)] for k in (0, 1)])
    return (*_teach(tiny_card(architecture=architecture), stacks), stacks)


def _images():  # type: ignore[no-untyped-def]
    import numpy as np

    images = np.zeros((2, 256, 256), np.float32)
    images[0, 30:70, 30:70] = 1.0
    images[0, 180:220, 160:230] = 0.8
    images[1] += 0.3
    return images


# The toy has learnt its two slices when every loss term is this small for SETTLED steps in a row: a mean
# cross-entropy of 0.05 over the answers' tokens, a Dice loss of 0.02 over the two masks (the tests then check
# the answers themselves). The [SEG] queries separate in a jump of a few steps, and a single step under a
# Dice bound of 0.05 once stopped the 2.5D toy mid-jump (Dice loss 0.046 at step 155, 0.008 at 157): its
# lung nodule's mask still held 177 pixels of the kidney tumour, which the engine reported as a second lesion.
CONVERGED = {"text": 0.05, "bce": 0.01, "dice": 0.02, "clear_bce": 0.01, "presence": 0.05}
SETTLED = 5


def _teach(card, stacks=None, steps=100, max_steps=1000):  # type: ignore[no-untyped-def]
    """Teach the toy at least ``steps`` steps, and on until it has learnt (``CONVERGED`` for ``SETTLED`` steps).
    How long that takes depends on the CPU's arithmetic: the two [SEG] queries stay on one mask (Dice loss about
    0.4) for a while before they separate, and that plateau ended before step 100 on one CPU, after 100 on AMD
    Zen 3 and after 200 on another. A fixed step count made the tests pass or fail by machine; a toy that never learns fails
    here, naming its losses. ``stacks``: the detail branch's input for the two slices, for a model with one."""
    import numpy as np
    import torch

    from inference.model.builtin import BuiltinModel
    from training.loss import grounded_loss

    torch.manual_seed(0)
    model = BuiltinModel.new(card)
    images = _images()
    targets = [torch.zeros(2, 256, 256), torch.zeros(0, 256, 256)]
    targets[0][0, 30:70, 30:70] = 1
    targets[0][1, 180:220, 160:230] = 1
    embeddings = model.encode(images)
    network = model.network
    optimizer = torch.optim.AdamW([
        {"params": [p for n, p in network.named_parameters() if p.requires_grad and not n.startswith("mask_decoder")], "lr": 5e-3},
        {"params": network.mask_decoder.parameters(), "lr": 5e-4},
    ])
    network.train()
    slices = None if stacks is None else torch.from_numpy(model.detail_input(images, stacks))
    settled = 0
    for step in range(1, max_steps + 1):
        detail = network.detail_features(slices) if slices is not None else None
        parts = grounded_loss(network, embeddings, QUESTION, TOY_ANSWERS, targets, detail)
        optimizer.zero_grad()
        parts.total.backward()
        optimizer.step()
        settled = settled + 1 if all(getattr(parts, name) < bound for name, bound in CONVERGED.items()) else 0
        if step >= steps and settled >= SETTLED:
            break
    else:
        pytest.fail(f"the toy model did not learn its two slices in {max_steps} steps: {parts}")
    network.eval()
    return model, images, embeddings, [t.bool().numpy() for t in targets], parts




@pytest.fixture(scope="session")
def trained_checkpoint(trained, tmp_path_factory) -> Path:
    """The tiny trained model saved as a checkpoint folder, for nodes started as separate processes."""
    folder = tmp_path_factory.mktemp("checkpoint") / "tiny"
    trained[0].save(folder)
    return folder
