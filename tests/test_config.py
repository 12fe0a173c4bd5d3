import pytest

from camelot import CamelotConfig


@pytest.mark.parametrize("field,value,needle", [
    ("window", 0, "window"), ("window", 1.5, "window"), ("slots", 0, "slots"), ("slots", -3, "slots"),
    ("threshold", 1.5, "threshold"), ("threshold", -1.01, "threshold"), ("threshold", "high", "threshold"),
    ("top_k", 0, "top_k"), ("strategy", "magic", "strategy"), ("search", "annoy", "search"),
    ("layers", [], "layers"), ("layers", [-1], "layers"), ("write_mode", "batch", "write_mode"),
    ("memory_distance", -1, "memory_distance"), ("retrieve", "nearest", "retrieve"),
])
def test_bad_values_name_the_field(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        CamelotConfig(**{field: value})


def test_top_k_cannot_exceed_slots():
    with pytest.raises(ValueError, match="top_k"):
        CamelotConfig(slots=4, top_k=8)


def test_defaults_and_replace():
    cfg = CamelotConfig()
    assert cfg.distance == cfg.window + cfg.recent  # memory sits right before the raw tail
    assert cfg.paper().distance == cfg.window and cfg.paper().top_k == 1
    assert cfg.paper().retrieve == "key" and cfg.retrieve == "query"  # the paper reads the slot nearest the key
    other = cfg.replace(window=64, layers=[3, 1, 1])
    assert other.window == 64 and other.layers == [1, 3] and cfg.window == 128
    assert CamelotConfig(memory_distance=0).distance == 0
