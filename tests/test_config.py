"""Config loading: defaults, overrides, and one-line errors that name the key."""
import pytest

from common.config import load_config
from common.errors import ConfigError


def test_tiny_config_loads_and_overrides_apply():
    config = load_config("configs/tiny.yaml", ["train.lr=2e-3", "generate.n=2"])
    assert config.train.lr == 2e-3 and config.generate.n == 2
    assert config.hash() != load_config("configs/tiny.yaml").hash()


@pytest.mark.parametrize("override, key", [
    ("train.lrr=1", "train.lrr"),
    ("generate.n=four", "generate.n"),
    ("train.mini_batch_prompts=48", "train.mini_batch_prompts"),
    ("train.mini_batch_prompts=128", "train.mini_batch_prompts"),
    ("train.policy_gradient=false", "train.policy_gradient"),
    ("train.zero_stage=5", "train.zero_stage"),
    ("train.loss=kl", "train.loss"),                      # a Literal choice: the error lists the choices
    ("generate.engine=trt", "generate.engine"),
    ("orchestrator.mode=threads", "orchestrator.mode"),
    ("generate.temperature=0.7", "generate.temperature"),  # the loss is at temperature 1: refused
    ("generate.top_p=0.9", "generate.top_p"),
    ("train.zero_stage=0", "train.zero_stage"),          # with 2 ranks (below): no global grad norm
])
def test_bad_values_name_the_key(override, key):
    extra = ["train.processes=2"] if override == "train.zero_stage=0" else []
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("configs/tiny.yaml", [override, *extra])


def test_literal_choices_are_listed_in_the_error():
    with pytest.raises(ConfigError, match="not one of k1, vopd, poweropd, k2, k3, abs, forward_kl_topk"):
        load_config("configs/tiny.yaml", ["train.loss=kl"])


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_the_hash_covers_what_changes_results_and_nothing_else():
    """A run can move to resident mode, another cluster, another MLflow store or thread count and keep
    its identity; a learning rate cannot."""
    base = load_config("configs/tiny.yaml")
    operational = ["orchestrator.mode=subprocess", "cluster.workers=2", "threads=1", "mlflow.experiment=other"]
    assert load_config("configs/tiny.yaml", operational).hash() == base.hash()
    assert load_config("configs/tiny.yaml", ["train.lr=1e-3"]).hash() != base.hash()


def test_a_max_model_len_below_the_longest_sequence_its_engine_holds_is_refused_for_either_role():
    """One rule for both engines: prompt + the longest response it samples (eval's too) or scores, + 1."""
    base = ["data.max_prompt_tokens=100", "generate.max_response_tokens=50", "eval.max_response_tokens=80"]
    load_config("configs/tiny.yaml", base + ["generate.max_model_len=181", "score.max_model_len=151"])
    with pytest.raises(ConfigError, match="generate.max_model_len': 151 < 181"):
        load_config("configs/tiny.yaml", base + ["generate.max_model_len=151"])  # enough for training, not eval
    with pytest.raises(ConfigError, match="score.max_model_len': 150 < 151"):
        load_config("configs/tiny.yaml", base + ["score.max_model_len=150"])
