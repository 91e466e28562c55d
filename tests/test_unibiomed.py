"""The UniBiomed / Sa2VA adapter against a stand-in checkpoint the test writes: same loading path
(AutoModel with trust_remote_code, auto_map), same predict_forward interface."""

import json
import textwrap

import numpy as np
import pytest

from inference.engine import Assessment, EngineConfig, interpret_volume
from inference.model.unibiomed import UniBiomedModel, clean_prediction
from inference.reliability import Reliability
from inference.slicing import SliceRef, Volume

CONFIGURATION = '''
from transformers import PretrainedConfig


class StandInConfig(PretrainedConfig):
    model_type = "standin_sa2va"

    def __init__(self, threshold=200, **kwargs):
        self.threshold = threshold
        super().__init__(**kwargs)
'''

MODELING = '''
import numpy as np
import torch
from transformers import PreTrainedModel

from .configuration_standin import StandInConfig


class StandInModel(PreTrainedModel):
    """Answers like UniBiomed: bright regions are "Liver tumor", one [SEG] and one mask each."""

    config_class = StandInConfig

    def __init__(self, config, use_flash_attn=False, **kwargs):
        super().__init__(config)
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.post_init()

    def predict_forward(self, image=None, video=None, text=None, past_text="", mask_prompts=None, tokenizer=None):
        assert "<image>" in text, "text must contain <image>"
        assert tokenizer.convert_tokens_to_ids("[SEG]") != tokenizer.unk_token_id
        pixels = np.asarray(image)[..., 0]
        mask = pixels >= self.config.threshold * float(self.scale)
        if not mask.any():
            return {"prediction": "No findings.<|end|>", "prediction_masks": []}
        return {"prediction": "It is [SEG]. Liver tumor.<|end|>", "prediction_masks": [mask[None]]}
'''


@pytest.fixture(scope="module")
def standin_checkpoint(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("standin")
    (folder / "configuration_standin.py").write_text(textwrap.dedent(CONFIGURATION))
    (folder / "modeling_standin.py").write_text(textwrap.dedent(MODELING))
    auto_map = {"AutoConfig": "configuration_standin.StandInConfig", "AutoModel": "modeling_standin.StandInModel"}
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "standin_sa2va", "architectures": ["StandInModel"], "threshold": 200, "auto_map": auto_map}))
    from safetensors.torch import save_file
    import torch

    save_file({"scale": torch.ones(1)}, folder / "model.safetensors", metadata={"format": "pt"})
    vocab = {w: i for i, w in enumerate(["<unk>", "<image>", "[SEG]", "It", "is", ".", "Liver", "tumor", "No", "findings"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>"}))
    return folder


def test_stand_in_loads_through_auto_model_and_answers(standin_checkpoint):
    model = UniBiomedModel(standin_checkpoint, device="cpu", input_size=64)
    images = np.zeros((2, 64, 64), np.float32)
    images[0, 10:20, 30:50] = 1.0
    results = model.interpret(images, "Can you identify any abnormality within this CT image? Please respond with segmentation masks.")
    assert [r.answer.text for r in results] == ["It is [SEG]. Liver tumor.", "No findings."]
    assert results[0].answer.findings == ["Liver tumor"]
    np.testing.assert_array_equal(results[0].answer.masks[0], images[0] >= 200 / 255)
    assert results[1].answer.masks.shape == (0, 64, 64) and results[0].samples == ()


def test_stand_in_through_the_engine_gives_lesions_of_unknown_reliability(standin_checkpoint):
    model = UniBiomedModel(standin_checkpoint, device="cpu", input_size=64)
    voxels = np.full((5, 64, 64), 40.0, np.float32)
    voxels[1:4, 20:40, 20:44] = 500.0
    volume = Volume(voxels, np.zeros(3), (1.0, 1.0, 2.0), np.eye(3), np.arange(5) * 2.0, "1.2", "CT", "1.2.7",
                    [SliceRef(f"1.2.7.{k}") for k in range(5)])
    result = interpret_volume(volume, model, EngineConfig())
    assert result.assessment is Assessment.ASSESSED
    [lesion] = result.lesions
    assert lesion.label == "Liver tumor" and lesion.slice_range == (1, 3)
    assert np.array_equal(lesion.mask, voxels > 300)
    assert lesion.reliability is Reliability.UNKNOWN


def test_special_tokens_are_stripped():
    assert clean_prediction("It is [SEG]. Liver tumor.<|end|></s>") == "It is [SEG]. Liver tumor."
