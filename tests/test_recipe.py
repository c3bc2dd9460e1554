import pytest

from compressor.errors import UserError
from compressor.recipe import apply_overrides, load_recipe


def test_quickstart_is_the_default_and_valid():
    r = load_recipe()
    assert r.name == "quickstart"
    assert r.teacher.model == "digits-resnet"
    assert [l.name for l in r.distill.losses] == ["kd", "ce"]
    assert r.distill.losses[0].params == {"temperature": 4.0}


def test_every_shipped_recipe_validates():
    from importlib import resources

    names = [p.name for p in (resources.files("profiles") / "recipes").iterdir() if p.name.endswith(".yaml")]
    assert "quickstart.yaml" in names
    for n in names:
        load_recipe(n[:-5])


def test_overrides_keep_yaml_types(tiny_recipe):
    r = load_recipe(tiny_recipe, ["distill.epochs=5", "distill.lr=0.5", "profile.batch_sizes=[1, 8]",
                                  "distill.losses.0.temperature=2", "budgets.size_mb=0.5"])
    assert r.distill.epochs == 5 and r.distill.lr == 0.5
    assert r.profile.batch_sizes == [1, 8]
    assert r.distill.losses[0].params["temperature"] == 2
    assert r.budgets.size_mb == 0.5


def test_override_does_not_mutate_input(tiny_recipe):
    apply_overrides(tiny_recipe, ["distill.epochs=9"])
    assert tiny_recipe["distill"]["epochs"] == 2


@pytest.mark.parametrize("data, overrides, needle", [
    ({"distill": {"epochz": 3}}, [], "distill.epochz: unknown key"),
    ({}, ["distill.epochs=ten"], "distill.epochs: Input should be a valid integer"),
    ({}, ["distill.losses=[]"], "at least one loss"),
    ({}, ["distill.losses.0.name=kdd"], "unknown loss 'kdd'"),
    ({}, ["distill.losses.0.temprature=3"], "takes no parameter temprature"),
    ({"budgets": {"latency_ms": {"jetson": 3}}}, [], "not in targets"),
    ({}, ["distill.losses.7.weight=1"], "has no item 7"),
    ({}, ["noequals"], "expected KEY=VALUE"),
    ({"quantize": {"mode": "qat-kd", "bits": 4, "zero_point": "int8"}}, [],
     "quantize.zero_point: Input should be 'integer' or 'float'"),
])
def test_bad_recipes_name_the_problem(tiny_recipe, data, overrides, needle):
    for k, v in data.items():
        tiny_recipe.setdefault(k, {}).update(v)
    with pytest.raises(UserError, match=needle.replace("[", r"\[").replace("(", r"\(")) as e:
        load_recipe(tiny_recipe, overrides)
    assert "\n" not in str(e.value)


def test_w4_zero_points_are_integer_unless_asked(tiny_recipe):
    """Integer zero points by default (ORT's fast MatMulNBits kernel); float (Polino's exact offset) on request."""
    assert load_recipe(tiny_recipe).quantize.zero_point == "integer"
    assert load_recipe(tiny_recipe, ["quantize.zero_point=float"]).quantize.zero_point == "float"


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(str(tmp_path / "nope.yaml"))


def test_yaml_syntax_error_names_the_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nteacher: {model: a\n")
    with pytest.raises(UserError, match="not valid YAML at line"):
        load_recipe(str(p))


def test_yaml_never_runs_code(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(str(p))


def test_a_list_is_not_a_recipe(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="YAML mapping"):
        load_recipe(str(p))


def test_every_shipped_recipe_survives_its_own_resolved_dump():
    """A bundle's recipe.yaml is the resolved recipe with every default spelled out; it must load
    again (and `--set` re-validates that dump too)."""
    from compressor.recipe import builtin_recipe, dump_recipe, load_recipe

    import yaml
    from importlib import resources

    for path in sorted((resources.files("profiles") / "recipes").iterdir()):
        if path.name.endswith(".yaml"):
            name = path.name[:-5]
            r = load_recipe(name)
            assert load_recipe(yaml.safe_load(dump_recipe(r))) == r, name
            assert load_recipe(name, ["seed=1"]).seed == 1
            assert builtin_recipe(name) is not None


def test_an_unknown_key_with_a_newline_is_named_on_one_line(tiny_recipe):
    """Found by the fuzz test: a key holding a newline split the one-line error in two."""
    from compressor.errors import UserError
    from compressor.recipe import load_recipe

    with pytest.raises(UserError) as e:
        load_recipe({**tiny_recipe, "budgets": {"\n": None}})
    assert "\n" not in str(e.value) and "budgets.'\\n': unknown key" in str(e.value)
