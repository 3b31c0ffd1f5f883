"""model.synthetic_shape: random weights with the real Qwen2.5 dimensions (GPU runs without the hub)."""

import pytest

from sftjobs.errors import SftjobsError
from sftjobs.io.demo_assets import make_demo_model, make_synthetic_arpo, qwen2_config, shape_mismatch

pytestmark = pytest.mark.train


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shapes")
    corpus = make_synthetic_arpo(tmp / "corpus.jsonl", 60)
    return make_demo_model(tmp / "tiny", corpus, log=lambda *_: None)


@pytest.mark.parametrize("shape,params", [("qwen2.5-0.5b", 494_032_768), ("qwen2.5-3b", 3_085_938_688)])
def test_real_shapes_have_the_real_parameter_counts(shape, params, tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = qwen2_config(shape, AutoTokenizer.from_pretrained(str(tiny_dir)))
    assert cfg.vocab_size == 151936 and cfg.tie_word_embeddings
    assert "1000000" in cfg.to_json_string()  # rope_theta (transformers 5 keeps it in rope_parameters)
    with torch.device("meta"):  # no memory, no time: only the shapes
        model = AutoModelForCausalLM.from_config(cfg)
    assert sum(p.numel() for p in model.parameters()) == params


def test_a_model_of_another_shape_is_named_not_overwritten(tiny_dir):
    assert shape_mismatch(tiny_dir, "tiny") is None
    diff = shape_mismatch(tiny_dir, "qwen2.5-0.5b")
    assert "hidden_size 64 (want 896)" in diff and "vocab_size" in diff
    with pytest.raises(SftjobsError, match="unknown synthetic model shape"):
        shape_mismatch(tiny_dir, "qwen2.5-7b")
