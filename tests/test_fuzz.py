"""Property-based fuzz: the recipe loader and the manifest reader never raise anything but a UserError."""
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compressor.bundle import read_manifest
from compressor.errors import UserError
from compressor.recipe import load_recipe
from conftest import TINY

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                      max_leaves=12)
KEYS = ["name", "seed", "task", "teacher", "teacher.model", "teacher.train.epochs", "data", "data.batch_size",
        "data.val_fraction", "student.config", "distill.epochs", "distill.losses", "distill.losses.0",
        "distill.losses.0.temperature", "distill.trainer.devices", "export.opset", "profile.batch_sizes",
        "targets", "budgets", "budgets.latency_ms", "budgets.max_quality_drop", "nonsense.key"]
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def mutate(base: dict, key: str, value):
    out = json.loads(json.dumps(base))
    node, parts = out, key.split(".")
    for p in parts[:-1]:
        if isinstance(node, list):
            p = int(p)
            if p >= len(node):
                return out
        elif not isinstance(node, dict):
            return out
        elif p not in node or not isinstance(node[p], (dict, list)):
            node[p] = {}
        node = node[p]
    if isinstance(node, dict):
        node[parts[-1]] = value
    return out


@FUZZ
@given(key=st.sampled_from(KEYS), value=values)
def test_recipe_mutations_never_crash(key, value):
    try:
        load_recipe(mutate(TINY, key, value))
    except UserError as e:
        assert "\n" not in str(e)


@FUZZ
@given(text=st.text(max_size=300))
def test_recipe_text_never_crashes(tmp_path_factory, text):
    p = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    p.write_text(text)
    try:
        load_recipe(str(p))
    except UserError as e:
        assert "\n" not in str(e)


@FUZZ
@given(override=st.text(max_size=40))
def test_overrides_never_crash(override):
    try:
        load_recipe(TINY, [override])
    except UserError:
        pass


@FUZZ
@given(doc=values, raw=st.binary(max_size=200), use_raw=st.booleans())
def test_manifest_reader_never_crashes(tmp_path_factory, doc, raw, use_raw):
    d = tmp_path_factory.mktemp("m")
    (d / "manifest.json").write_bytes(raw if use_raw else json.dumps(doc).encode())
    try:
        read_manifest(d)
    except UserError:
        pass
