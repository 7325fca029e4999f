"""Native SAE files with a careless or hostile concept library, or weights in any float dtype.

Files here carry no checksum (as a third-party tool writes them), so only the validation on read stands
between a bad library and an erasure that silently does nothing. The property-based test mutates the
shipped demo SAEs; raise its example count with ``SAEURON_FUZZ_EXAMPLES`` (default 40).
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import assert_user_error, run_cli, tiny_model
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from planted import concept, planted_sae
from safetensors.torch import save_file

from saeuron_core.erasure.eraser import ConceptEraser
from saeuron_core.errors import ConfigError, SAEFormatError, SaeuronError
from saeuron_core.hosts.hooks import BlockCall
from saeuron_core.sae.files import content_digest, load_sae
from saeuron_core.sae.library import add_concept, get_concept
from saeuron_core.safetensors_io import load_safetensors

ASSETS = Path(__file__).resolve().parents[1] / "demo_assets"
SHIPPED = sorted(ASSETS.glob("*.safetensors"))
DEMO = ASSETS / "sae.safetensors"
NAME = "star"
FUZZ = settings(max_examples=int(os.environ.get("SAEURON_FUZZ_EXAMPLES", "40")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
_CACHE: dict[Path, tuple[dict, dict]] = {}


def shipped(path: Path = DEMO) -> tuple[dict, dict]:
    """Fresh copies of a shipped file's tensors and metadata, without its checksum."""
    if path not in _CACHE:
        tensors, metadata = load_safetensors(path)
        metadata.pop("sha256")
        _CACHE[path] = tensors, metadata
    tensors, metadata = _CACHE[path]
    return {k: v.clone() for k, v in tensors.items()}, dict(metadata)


def write(path: Path, tensors: dict, metadata: dict) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def key_of(metadata: dict, name: str = NAME) -> str:
    return json.loads(metadata["concepts"])[name]["key"]


# -- hostile files, one field at a time ---------------------------------------------------------

def tensor_edit(field, edit):
    def make(t, m):
        name = f"concepts.{key_of(m)}.{field}"
        t[name] = edit(t[name].clone())
    return make


def entry_edit(edit):
    def make(t, m):
        library = json.loads(m["concepts"])
        edit(library[NAME], library)
        m["concepts"] = json.dumps(library)
    return make


def first(value):
    def edit(x):
        x.view(-1)[0] = value
        return x
    return edit


def fill(value):
    return lambda x: torch.full_like(x, value)


HOSTILE = {
    "threshold NaN": ("threshold", tensor_edit("threshold", first(float("nan")))),
    "threshold inf": ("threshold", tensor_edit("threshold", fill(float("inf")))),
    "threshold < 0": ("threshold", tensor_edit("threshold", fill(-1.0))),
    "mu inf": ("mu", tensor_edit("mu", fill(float("inf")))),
    "mu NaN": ("mu", tensor_edit("mu", first(float("nan")))),
    "mu < 0": ("mu", tensor_edit("mu", fill(-1.0))),
    "scores NaN": ("scores", tensor_edit("scores", first(float("nan")))),
    "mu beyond float32": ("mu", tensor_edit("mu", lambda x: first(1e300)(x.double()))),
    "feature id too large": ("feature_ids", tensor_edit("feature_ids", first(5000))),
    "feature id negative": ("feature_ids", tensor_edit("feature_ids", first(-1))),
    "feature ids float": ("feature_ids", tensor_edit("feature_ids", lambda x: x.double())),
    "n_selected > candidates": ("n_selected", tensor_edit("n_selected", first(1000))),
    "n_selected negative": ("n_selected", tensor_edit("n_selected", first(-1))),
    "observed not 0/1": ("observed", tensor_edit("observed", first(7))),
    "observed nowhere": ("observed", tensor_edit("observed", fill(0))),
    "mu other shape": ("mu", tensor_edit("mu", lambda x: x[:, :10])),
    "n_selected 2-d": ("n_selected", tensor_edit("n_selected", lambda x: x[:, None])),
    "feature_ids 1-d": ("feature_ids", tensor_edit("feature_ids", lambda x: x[0])),
    "bucket_width 0": ("bucket_width", entry_edit(lambda e, lib: e.update(bucket_width=0))),
    "bucket_width NaN": ("bucket_width", entry_edit(lambda e, lib: e.update(bucket_width=float("nan")))),
    "bucket_width < 0": ("bucket_width", entry_edit(lambda e, lib: e.update(bucket_width=-20))),
    "bucket_width text": ("bucket_width", entry_edit(lambda e, lib: e.update(bucket_width="20"))),
    "buckets do not span": ("bucket_width", entry_edit(lambda e, lib: e.update(bucket_width=7))),
    "max_timestep 0": ("max_timestep", entry_edit(lambda e, lib: e.update(max_timestep=0))),
    "max_timestep 1.5": ("max_timestep", entry_edit(lambda e, lib: e.update(max_timestep=1.5))),
    "max_timestep huge": ("max_timestep", entry_edit(lambda e, lib: e.update(max_timestep=10**400))),
    "key missing": ("key", entry_edit(lambda e, lib: e.pop("key"))),
    "key of no tensors": ("feature_ids", entry_edit(lambda e, lib: e.update(key="nothing_here"))),
    "info not an object": ("info", entry_edit(lambda e, lib: e.update(info=[1]))),
    "unknown field": ("treshold", entry_edit(lambda e, lib: e.update(treshold=3))),
    "dead decoder row": ("feature_ids", lambda t, m: t["W_dec"].__setitem__(own_feature(t, m), 0.0)),
}


def own_feature(t: dict, m: dict) -> int:
    """A feature that the concept selects and no other concept lists."""
    others = {int(f) for name in json.loads(m["concepts"]) if name != NAME
              for f in t[f"concepts.{key_of(m, name)}.feature_ids"].unique()}
    ids, n = t[f"concepts.{key_of(m)}.feature_ids"], t[f"concepts.{key_of(m)}.n_selected"]
    return next(int(f) for b in range(len(n)) for f in ids[b, : n[b]] if int(f) not in others)


@pytest.mark.parametrize("case", HOSTILE)
def test_each_library_field_is_checked_on_read(tmp_path, case):
    field, make = HOSTILE[case]
    tensors, metadata = shipped()
    make(tensors, metadata)
    path = write(tmp_path / "s.safetensors", tensors, metadata)
    with pytest.raises(SAEFormatError) as info:
        load_sae(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and f"concept {NAME!r}" in message and repr(field) in message, message


def test_library_wide_checks(tmp_path):
    tensors, metadata = shipped()
    library = json.loads(metadata["concepts"])
    library[NAME]["key"] = library["circle"]["key"]
    write(tmp_path / "shared.safetensors", tensors, {**metadata, "concepts": json.dumps(library)})
    with pytest.raises(SAEFormatError, match="'circle' and 'star' share the key"):
        load_sae(tmp_path / "shared.safetensors")
    tensors, metadata = shipped()
    tensors["concepts.gone_12345678.mu"] = torch.zeros(2)
    write(tmp_path / "stray.safetensors", tensors, metadata)
    with pytest.raises(SAEFormatError, match="'concepts.gone_12345678.mu' belongs to no concept"):
        load_sae(tmp_path / "stray.safetensors")
    tensors, metadata = shipped()
    library = json.loads(metadata["concepts"])
    library["star"] = 3
    write(tmp_path / "entry.safetensors", tensors, {**metadata, "concepts": json.dumps(library)})
    with pytest.raises(SAEFormatError, match="concept 'star': library entry must be a JSON object"):
        load_sae(tmp_path / "entry.safetensors")


def test_the_cli_refuses_hostile_files_with_one_line(capsys, tmp_path):
    tensors, metadata = shipped()
    HOSTILE["threshold NaN"][1](tensors, metadata)
    path = write(tmp_path / "s.safetensors", tensors, metadata)
    for args in (["info", path], ["erase", "--model", tiny_model(), "--sae", path, "--concept", NAME, "--prompt", "a star",
                                  "--out", tmp_path / "g.png"]):
        assert_user_error(*run_cli(capsys, *args)[::2], f"{path}: concept 'star', field 'threshold': must be finite")


def test_concepts_are_checked_when_added_too():
    sae = planted_sae()
    bad = concept("cat", {range(50): [3]})
    bad.mu[4, 0] = float("nan")
    with pytest.raises(ConfigError, match="concept 'cat', field 'mu': must be finite"):
        add_concept(sae, bad)
    with pytest.raises(ConfigError, match="field 'feature_ids': names feature 40"):
        add_concept(sae, concept("cat", {range(50): [40]}))
    assert sae.concepts == {}


def test_an_eraser_refuses_a_concept_that_selects_nothing():
    sae = planted_sae()
    add_concept(sae, concept("empty", {}))
    get_concept(sae, "empty")  # a valid entry: inspection shows it selects nothing
    with pytest.raises(ConfigError, match="'empty' selects no feature at any timestep"):
        ConceptEraser(sae, ["empty"], "ablate")


# -- erasing on a probe (a token built to fire a concept), and SAE dtypes ----------------------------

def call_for(x: torch.Tensor, t: float) -> BlockCall:
    return BlockCall(tokens=x, spatial=None, timesteps=torch.full((x.shape[0],), float(t)),
                     is_cond=torch.ones(x.shape[0], dtype=torch.bool), call_index=0)


def selected(c, t: float, strength: float) -> dict[int, tuple[float, float]]:
    """``{feature: (threshold, scale)}`` selected at timestep ``t``, as the eraser merges them (lowest of each)."""
    b = int(min(max(t // c.bucket_width, 0), c.n_buckets - 1))
    out: dict[int, tuple[float, float]] = {}
    for j in range(int(c.n_selected[b])):
        f, thr, scale = int(c.feature_ids[b, j]), float(c.threshold[b, j]), -strength * float(c.mu[b, j])
        old = out.get(f, (thr, scale))
        out[f] = (min(old[0], thr), min(old[1], scale))
    return out


def firing(sae, token: torch.Tensor, table: dict[int, tuple[float, float]]) -> dict[int, float]:
    """``{feature: activation}`` of the selected features that surely fire on ``token`` by the eraser's rule (above
    the threshold, positive, in the SAE's top k), computed in float64 without the eraser's code: each margin must
    exceed the rounding error of the SAE's own arithmetic (huge weights make its results noise)."""
    w, b = sae.encoder.weight.detach().double(), sae.encoder.bias.detach().double()
    x = token.to(sae.dtype).double() - sae.b_dec.detach().double()
    pre = (w @ x + b).clamp_min(0)
    err = 16 * torch.finfo(sae.dtype).eps * (w.abs() @ x.abs() + b.abs() + sae.b_dec.detach().double().abs().max())
    out = {}
    for f, (thr, _) in table.items():
        low = pre[f] - err[f]
        rivals = torch.cat([pre[:f] + err[:f], pre[f + 1:] + err[f + 1:]])
        if low > max(float(torch.tensor(thr).to(sae.dtype)), 0.0) and low > rivals.topk(sae.k).values.min():
            out[f] = float(pre[f])
    return out


def probe(sae, c, model_dtype, strength: float = 1.0):
    """``(timestep, tokens [1, 4, d], firing features)``: two tokens on which selected features of ``c`` fire, then
    two background tokens; ``None`` when no selected feature of a few selecting buckets can be made to fire."""
    buckets = c.n_selected.nonzero().squeeze(1)
    for b in buckets[torch.linspace(0, len(buckets) - 1, min(4, len(buckets))).long()].tolist():
        t = min((b + 0.5) * c.bucket_width, float(c.max_timestep))
        table = selected(c, t, strength)
        for f in list(table)[:4]:
            w, bias = sae.encoder.weight.detach()[f].double(), float(sae.encoder.bias.detach()[f])
            x = sae.b_dec.detach().double() + w * ((2 * table[f][0] + 1 - bias) / w.dot(w))  # pre-act 2 thr + 1
            tokens = sae.b_dec.detach().double().expand(1, 4, -1).clone()
            tokens[0, :2] = x
            tokens = tokens.to(model_dtype)
            fires = firing(sae, tokens[0, 0], table)
            if fires and torch.isfinite(tokens).all():
                return t, tokens, {f: (a, table[f][1]) for f, a in fires.items()}
    return None


def ablated(sae, token: torch.Tensor, fires: dict[int, tuple[float, float]]) -> torch.Tensor:
    """The token ablated by the formula ``a -> scale * a`` of each firing feature, in float64."""
    new = token.double().clone()
    for f, (a, scale) in fires.items():
        new += (scale - 1.0) * a * sae.W_dec.detach()[f].double()
    return new


def check_erasure(sae, name: str, method: str, model_dtype: torch.dtype) -> str:
    """Erase ``name`` on a probe; the erasure refuses cleanly or changes the probe wherever the change shows in
    the model's dtype (a result beyond that dtype's range leaves the token as it was, as documented)."""
    try:
        eraser = ConceptEraser(sae, [name], method, strength=1.0)
    except SaeuronError as exc:
        assert str(exc)
        return "eraser refused"
    found = probe(sae, get_concept(sae, name), model_dtype)
    if found is None:
        x = sae.b_dec.detach().expand(1, 4, -1).to(model_dtype).clone()
        out = eraser(call_for(x, 500.0))
        assert out is None or out.dtype == model_dtype
        return "no probe"
    t, x, fires = found
    out = eraser(call_for(x, t))
    assert out is not None, f"{name}: the eraser left a firing concept alone"
    assert out.dtype == model_dtype and torch.isfinite(out).all()
    changed = not torch.equal(out[0, :2], x[0, :2])
    if method == "replace":
        assert changed, f"{name}: replace detected nothing on a firing token"
        return "erased"
    expected = ablated(sae, x[0, 0], fires)
    limit = torch.finfo(model_dtype).max / 4
    if not torch.isfinite(expected).all() or expected.abs().max() > limit:
        return "beyond the model dtype"
    if (expected - x[0, 0].double()).abs().max() < 0.05 * (x[0, 0].double().abs().max() + 1):
        return "change too small to show"
    assert changed, f"{name}: ablation changed nothing on a token where its features fire"
    return "erased"


@pytest.mark.parametrize("sae_dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_shipped_sae_in_any_float_dtype_erases_against_any_model_dtype(tmp_path, sae_dtype):
    tensors, metadata = shipped()
    as_dtype = {k: v.to(sae_dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    sae = load_sae(write(tmp_path / "s.safetensors", as_dtype, metadata))
    reference = load_sae(DEMO)
    assert sae.dtype == sae_dtype
    c = get_concept(reference, NAME)
    for model_dtype in (torch.float32, torch.float16, torch.bfloat16):
        t, x, _ = probe(reference, c, model_dtype)
        for method in ("ablate", "replace"):
            want = ConceptEraser(reference, [NAME], method)(call_for(x, t))
            got = ConceptEraser(sae, [NAME], method)(call_for(x, t))
            assert got.dtype == model_dtype and not torch.equal(got, x)
            torch.testing.assert_close(got.double(), want.double(), atol=0.1 * (want.abs().max().item() + 1), rtol=0)


def test_float8_and_integer_weights_are_refused(tmp_path):
    for dtype in (torch.float8_e4m3fn, torch.int32):
        tensors, metadata = shipped()
        tensors["W_dec"] = tensors["W_dec"].to(dtype)
        with pytest.raises(SAEFormatError, match=r"'W_dec' has dtype \w+; expected a float tensor \(float32"):
            load_sae(write(tmp_path / "s.safetensors", tensors, metadata))


def test_weights_that_overflow_the_sae_dtype_are_refused(tmp_path):
    tensors, metadata = shipped()
    tensors["W_dec"] = tensors["W_dec"].half()  # the SAE takes W_dec's dtype
    tensors["encoder.weight"] = tensors["encoder.weight"].double()
    tensors["encoder.weight"][0, 0] = 1e10
    with pytest.raises(SAEFormatError, match="'encoder.weight' has values beyond the range of float16"):
        load_sae(write(tmp_path / "s.safetensors", tensors, metadata))


def test_the_cli_erases_with_a_float64_sae(capsys, tmp_path):
    tensors, metadata = shipped()
    path = write(tmp_path / "s.safetensors", {k: v.double() if v.is_floating_point() else v
                                              for k, v in tensors.items()}, metadata)
    code, out, err = run_cli(capsys, "erase", "--model", ASSETS / "model", "--sae", path, "--concept", NAME,
                             "--strength", "2", "--prompt", "a star in solid style", "--steps", "4", "--seed", "1",
                             "--out", tmp_path / "g.png")
    assert code == 0, err
    from PIL import Image

    image = Image.open(tmp_path / "g.png").convert("L")
    pixels = torch.from_numpy(np.array(image))
    half = image.width // 2
    assert not torch.equal(pixels[:, :half], pixels[:, half:])  # the erasure changed the picture


# -- property: any mutation of a shipped file is refused cleanly or gives an SAE that erases -----------

SPECIAL = st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0, -1.0, 1e-30, 1e30, -1e30, 3e38, 1e300])
INTS = st.sampled_from([-1, 0, 1, 3, 63, 64, 1023, 1024, 2**40])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.sampled_from([10**400, 1000, 20])
                    | st.floats(allow_nan=True) | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                    max_leaves=6)
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.int64,
          torch.int32, torch.int16, torch.uint8, torch.bool]


def scalar(value: float, dtype: torch.dtype) -> torch.Tensor:
    """``value`` in ``dtype`` as a careless tool would store it: overflowing floats become inf, ints are clamped."""
    if dtype.is_floating_point:
        return torch.tensor(float(value), dtype=torch.float64).to(dtype)
    if dtype == torch.bool:
        return torch.tensor(bool(value))
    info = torch.iinfo(dtype)
    return torch.tensor(int(min(max(value, info.min), info.max)), dtype=dtype)


@st.composite
def mutated(draw):
    """``(source file, tensors, metadata, concept to erase, what was done)``, one mutation of a shipped file."""
    source = draw(st.sampled_from(SHIPPED))
    t, m = shipped(source)
    library = json.loads(m["concepts"])
    name = draw(st.sampled_from(sorted(library)))
    key = library[name]["key"]
    names = sorted(t)
    target = draw(st.sampled_from([n for n in names if n.startswith(f"concepts.{key}.")] + [n for n in names
                                  if not n.startswith("concepts.")]))
    kind = draw(st.sampled_from(["entry", "metadata", "value", "values", "dtype", "all dtypes", "shape", "name"]))
    if kind == "entry":
        entry = library[name]
        field = draw(st.sampled_from(sorted(entry) + ["extra"]))
        action = draw(st.sampled_from(["set", "delete", "rename concept", "drop concept"]))
        if action == "set":
            entry[field] = draw(JSON)
        elif action == "delete":
            entry.pop(field, None)
        elif action == "rename concept":
            library[draw(st.text(max_size=10))] = library.pop(name)
        else:
            del library[name]
        m["concepts"] = json.dumps(library)
        what = f"{action} {field}"
    elif kind == "metadata":
        field = draw(st.sampled_from(sorted(m)))
        value = json.loads(m[field]) if field != "saeuron_format" else m[field]
        if isinstance(value, dict) and value and draw(st.booleans()):
            value[draw(st.sampled_from(sorted(value)))] = draw(JSON)
            m[field] = json.dumps(value)
        else:
            m[field] = json.dumps(draw(JSON))
        what = f"metadata {field}"
    elif kind in ("value", "values"):
        x = t[target]
        value = draw(SPECIAL) if x.is_floating_point() else draw(INTS)
        cell = scalar(value, x.dtype)
        if kind == "value" and x.numel():
            x.reshape(-1)[draw(st.integers(0, x.numel() - 1))] = cell
        else:
            t[target] = cell.expand_as(x).clone()
        what = f"{kind} {value} in {target}"
    elif kind == "dtype":
        dtype = draw(st.sampled_from(DTYPES))
        t[target] = t[target].to(dtype)
        what = f"{target} as {dtype}"
    elif kind == "all dtypes":
        dtype = draw(st.sampled_from(DTYPES[:5]))
        t = {k: v.to(dtype) if v.is_floating_point() else v for k, v in t.items()}
        what = f"all float tensors as {dtype}"
    elif kind == "shape":
        x = t[target]
        change = draw(st.sampled_from(["drop row", "add row", "flatten", "transpose", "unsqueeze", "empty", "scalar"]))
        t[target] = {"drop row": lambda: x[:-1], "add row": lambda: torch.cat([x, x[-1:]]),
                     "flatten": lambda: x.reshape(-1), "transpose": lambda: x.T if x.dim() == 2 else x[None],
                     "unsqueeze": lambda: x[None], "empty": lambda: x[:0], "scalar": lambda: x.reshape(-1)[0]}[change]()
        what = f"{change} of {target}"
    else:
        new = draw(st.sampled_from(names + [target + "x", "W_enc", "concepts.x.mu", draw(st.text(min_size=1,
                                                                                               max_size=12))]))
        tensor = t.pop(target)
        t[new] = tensor
        what = f"{target} renamed {new!r}"
    if draw(st.booleans()):
        m["sha256"] = content_digest(t, m)  # a well-formed file whose checksum agrees with its bad contents
    library = json.loads(m["concepts"]) if isinstance(m.get("concepts"), str) else {}
    chosen = name if isinstance(library, dict) and name in library else None
    return source, t, m, chosen, what


@FUZZ
@given(case=mutated(), method=st.sampled_from(["ablate", "replace"]),
       model_dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_any_mutation_is_refused_cleanly_or_erases(tmp_path_factory, case, method, model_dtype):
    source, tensors, metadata, name, what = case
    path = tmp_path_factory.mktemp("m") / source.name
    try:
        write(path, tensors, metadata)
    except Exception:  # safetensors cannot even write it (e.g. an empty name): nothing to read
        event("not writable")
        return
    try:
        sae = load_sae(path)
    except SaeuronError as exc:
        assert str(exc).startswith(f"{path}: "), str(exc)  # names the file
        event("refused on read")
        return
    if name is None or name not in sae.concepts:
        name = sorted(sae.concepts)[0] if sae.concepts else None
    if name is None:
        event("loaded, no concept left")
        return
    event(check_erasure(sae, name, method, model_dtype))


def test_every_shipped_concept_erases_on_its_probe():
    for path in SHIPPED:
        sae = load_sae(path)
        for name in sae.concepts:
            for method in ("ablate", "replace"):
                assert check_erasure(sae, name, method, torch.float32) == "erased", (path.name, name, method)
