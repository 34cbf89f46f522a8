"""The reference experiment, end to end: profile -> pick neurons -> extract -> SAE -> Patchscope.

Every input is checked before the model loads; the atlas in ``--out`` is reused (or resumed from its
checkpoint); ``results.json`` is written atomically at the end.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from patchscope.atlas.atlas import Atlas
from patchscope.atlas.store import ATLAS_TENSORS, load_atlas
from patchscope.sae.attribution import attribute_neuron
from patchscope.atlas.sources import SourceConfig, TextSource
from patchscope.model.loading import DEFAULT_MODEL, DeviceName, DTypeName, load_config, load_model, load_tokenizer, preset_for, resolve_device, resolve_dtype
from patchscope.scope.config import PatchscopeConfig
from patchscope.scope.extract import extract
from patchscope.scope.inject import Row, control_rows, inject
from patchscope.scope.placeholder import plan_prompt
from patchscope.atlas.config import ProfileConfig
from patchscope.atlas.run import CHECKPOINT, fingerprint, profile
from patchscope.sae.jumprelu import check_for_model, check_site, top_features
from patchscope.sae.loaders import load_sae, sae_spec_for_site
from patchscope.model.sites import parse_site
from patchscope.util.storage import check_writable, write_json
from patchscope.util.versions import versions
from patchscope.report.run_report import write_run_report

RESULTS = "results.json"


@dataclass(frozen=True)
class ExperimentConfig:
    """The run as a whole: model, output, which neurons, which SAE."""

    model: str = DEFAULT_MODEL
    """HF hub id, preset name or local directory."""
    dtype: DTypeName = "auto"
    """auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16 or float16."""
    device: DeviceName = "auto"
    """auto, cpu or cuda."""
    out: str = "patchscope-out"
    """Output directory: atlas, exports, results.json."""
    neuron: int | None = None
    """Neuron to study (default: the atlas's top neuron by maximum activation)."""
    top_neurons: int = 1
    """Sweep the N neurons with the largest maxima in one batched Patchscope run."""
    sae: str | None = None
    """SAE spec (file, folder or REPO/PATH); default: the matching Gemma Scope residual SAE; 'none' skips it."""
    sae_top_k: int = 10
    """SAE features to report."""
    allow_site_mismatch: bool = False
    """Apply an SAE to a vector from a site it was not trained on (warns)."""
    source: SourceConfig = field(default_factory=SourceConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    patchscope: PatchscopeConfig = field(default_factory=PatchscopeConfig)

    @property
    def source_site(self) -> str:
        return self.patchscope.source_site or f"blocks.{self.profile.layer}.hook_resid_pre"

    @property
    def target_site(self) -> str:
        return self.patchscope.target_site or self.source_site

    @property
    def neuron_site(self) -> str:
        return f"blocks.{self.profile.layer}.mlp.hook_post"

    def profile_config(self) -> ProfileConfig:
        """The profile also records the source site, whose mean is the corpus-mean control."""
        sites = tuple(dict.fromkeys((self.neuron_site, self.source_site, *self.profile.sites)))
        return dataclasses.replace(self.profile, sites=sites)


@dataclass
class NeuronResult:
    neuron: int
    max_activation: float
    source: dict[str, Any]
    sae: dict[str, Any] | None
    patched: dict[str, Any]
    controls: dict[str, dict[str, Any]]
    verdict: str


@dataclass
class ExperimentResult:
    config: dict[str, Any]
    prompt: dict[str, Any]
    neurons: list[NeuronResult]
    timings: dict[str, float]
    versions: dict[str, str]
    atlas: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Timer:
    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.phases[name] = round(time.perf_counter() - started, 3)


def _preflight(config: ExperimentConfig):
    """Everything that can be checked without model weights: sites, layer, neuron, prompt, SAE, output."""
    config.patchscope.validate()
    config.profile.validate()
    if config.top_neurons < 1:
        raise ValueError(f"`top_neurons` must be at least 1, got {config.top_neurons}")
    model_config = load_config(config.model)
    n_layers = model_config.num_hidden_layers
    for site in (config.source_site, config.target_site, config.neuron_site):
        layer, _ = parse_site(site)
        if not -1 <= layer < n_layers:
            raise ValueError(f"site {site}: layer {layer} is out of range, the model has layers 0..{n_layers - 1}")
    if config.neuron is not None and not 0 <= config.neuron < model_config.intermediate_size:
        raise IndexError(f"`neuron` {config.neuron} is out of range: the MLP has neurons 0..{model_config.intermediate_size - 1}")
    prompt = plan_prompt(load_tokenizer(config.model), config.patchscope)
    sae, sae_note = _load_matching_sae(config, model_config.hidden_size)
    out = check_writable(config.out)
    _check_existing_atlas(config, out)
    return prompt, sae, sae_note, out


def _load_matching_sae(config: ExperimentConfig, d_model: int):
    if config.sae and config.sae.lower() == "none":
        return None, "SAE read-out skipped (`sae` none)"
    spec = config.sae
    if spec is None:
        if preset_for(config.model) is None:
            return None, f"no default SAE for {config.model}; pass `sae` to read the vector"
        spec = sae_spec_for_site(config.model, config.source_site)
    sae = load_sae(spec)
    check_for_model(sae, d_model)
    check_site(sae, config.source_site, allow_mismatch=config.allow_site_mismatch)
    return sae, f"SAE {sae.info.source} (trained on {sae.info.site})"


def _atlas_key(config: ExperimentConfig, dtype: torch.dtype) -> str:
    return fingerprint(config.model, config.source, config.profile_config(), str(dtype).removeprefix("torch."))


def _check_existing_atlas(config: ExperimentConfig, out: Path) -> None:
    """An atlas in --out made with other settings is refused, not overwritten."""
    if not (out / ATLAS_TENSORS).exists():
        return
    dtype = resolve_dtype(config.dtype, resolve_device(config.device))
    found = load_atlas(out).meta.extra.get("fingerprint")
    if found != _atlas_key(config, dtype):
        raise FileExistsError(
            f"{out} holds an atlas made with other settings (model, data, layer, sites, max length or dtype); "
            "use another `out`, or delete it to profile again"
        )


def _atlas(model, tokenizer, config: ExperimentConfig, out: Path, timer: _Timer, progress: bool) -> tuple[Atlas, bool]:
    profile_config = config.profile_config()
    if (out / ATLAS_TENSORS).exists():  # checked against the settings before the model loaded
        return load_atlas(out), True
    with timer.phase("profile"):
        atlas = profile(
            model, tokenizer, TextSource(config.source), profile_config, out=out, resume=(out / CHECKPOINT).exists(), model_name=config.model,
            progress=progress,
        )
    return atlas, False


def _verdict(patched: float, controls: dict[str, float]) -> str:
    if not controls:
        return "no controls run"
    beaten = [name for name, value in controls.items() if patched > value]
    if len(beaten) == len(controls):
        return f"above every control ({', '.join(controls)})"
    if not beaten:
        return "not above any control: the patch does not reactivate this neuron"
    return f"above {', '.join(beaten)} only"


def run_experiment(config: ExperimentConfig, *, progress: bool = True) -> ExperimentResult:
    """Profile, pick neurons, extract their vectors, read them with the SAE, patch them into the prompt."""
    timer = _Timer()
    prompt, sae, sae_note, out = _preflight(config)
    notes = [sae_note]
    with timer.phase("load_model"):
        model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    atlas, reused = _atlas(model, tokenizer, config, out, timer, progress)
    notes.append("atlas reused from `out`" if reused else "atlas profiled in this run")
    source = TextSource(config.source)

    with timer.phase("extract"):
        neurons = [config.neuron] if config.neuron is not None else atlas.top_neurons(config.neuron_site, config.top_neurons)
        entries = [atlas.entry(config.neuron_site, n) for n in neurons]
        texts = source.fetch({e.doc for e in entries})
        extractions = [
            extract(
                model, tokenizer, texts[e.doc], site=config.source_site, position=e.position, entry=e,
                max_length=atlas.meta.max_length, overflow=atlas.meta.overflow,
            )
            for e in entries
        ]

    sae_results: list[dict[str, Any] | None] = [None] * len(neurons)
    if sae is not None:
        with timer.phase("sae"):
            sae = sae.to(extractions[0].vector.device)
            for i, (entry, ex) in enumerate(zip(entries, extractions)):
                readout = top_features(sae, ex.vector, config.sae_top_k, position=ex.position)
                attribution = attribute_neuron(
                    model, sae, torch.tensor([ex.segment_ids], device=ex.vector.device), ex.local_position, ex.vector,
                    site=config.source_site, neuron=entry.neuron, neuron_site=config.neuron_site,
                    allow_site_mismatch=config.allow_site_mismatch,
                )
                sae_results[i] = {
                    "sae": sae.info.source,
                    "sae_site": sae.info.site,
                    "l0": readout.l0,
                    "relative_error": readout.relative_error,
                    "cosine": readout.cosine,
                    "top_features": [dataclasses.asdict(f) for f in readout.features],
                    "warnings": readout.warnings,
                    "features_driving_neuron": [dataclasses.asdict(f) for f in attribution.features[: config.sae_top_k]],
                }

    with timer.phase("patchscope"):
        source_stats = atlas.sites.get(config.source_site)
        mean = source_stats.mean.float() if source_stats is not None else None
        rows: list[Row] = []
        for entry, ex in zip(entries, extractions):
            rows.append(Row("patched", entry.neuron, ex.vector))
            if config.patchscope.controls:
                rows.append(Row("unpatched", entry.neuron, None))
                rows += control_rows(ex.vector, entry.neuron, mean=mean, seed=config.patchscope.seed)
        observations = inject(
            model, tokenizer, rows, prompt, target_site=config.target_site, observe_site=config.neuron_site,
            max_new_tokens=config.patchscope.max_new_tokens, temperature=config.patchscope.temperature,
            top_p=config.patchscope.top_p, seed=config.patchscope.seed,
        )

    results = []
    for i, (entry, ex) in enumerate(zip(entries, extractions)):
        mine = [o for o in observations if o.neuron == entry.neuron]
        for o in mine:
            o.ratio = o.at_placeholder / entry.activation if entry.activation else None
        patched = next(o for o in mine if o.label == "patched")
        controls = {o.label: o for o in mine if o.label != "patched"}
        results.append(
            NeuronResult(
                neuron=entry.neuron,
                max_activation=entry.activation,
                source={
                    "doc": entry.doc, "position": entry.position, "token": ex.token, "context": ex.context,
                    "site": config.source_site, "recomputed_activation": ex.activation, "vector_norm": float(ex.vector.float().norm()),
                },
                sae=sae_results[i],
                patched=dataclasses.asdict(patched),
                controls={k: dataclasses.asdict(v) for k, v in controls.items()},
                verdict=_verdict(patched.at_placeholder, {k: v.at_placeholder for k, v in controls.items()}),
            )
        )
    result = ExperimentResult(
        config=_jsonable(config),
        prompt={"text": config.patchscope.prompt, "tokens": prompt.tokens, "position": prompt.position, "token": prompt.tokens[prompt.position]},
        neurons=results,
        timings=timer.phases,
        versions=versions(),
        atlas={"path": str(out), "reused": reused, "n_tokens": atlas.n_tokens, "n_documents": atlas.meta.n_documents, **atlas.meta.extra},
        notes=notes,
    )
    write_json(out / RESULTS, result.to_json())
    write_run_report(result.to_json(), out / "report.html", model, tokenizer)
    return result


def _jsonable(config: ExperimentConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def format_summary(result: ExperimentResult) -> str:
    """The original's "Experiment Results" block, plus the controls."""
    cfg = result.config
    lines = [
        "=== Experiment Results ===",
        f"model {cfg['model']}   layer {cfg['profile']['layer']}   data {cfg['source']['dataset']} {cfg['source']['split']}"
        f"   {result.atlas['n_documents']} documents, {result.atlas['n_tokens']} tokens",
        f"prompt {result.prompt['text']!r}: vector written at position {result.prompt['position']} ({result.prompt['token']!r})",
    ]
    for n in result.neurons:
        src = n.source
        lines += [
            "",
            f"neuron {n.neuron}: max activation {n.max_activation:.4f} on {src['token']!r} (document {src['doc']}, position {src['position']})",
            f"  context: {src['context']!r}",
        ]
        if n.sae:
            feats = ", ".join(f"{f['index']} ({f['activation']:.2f})" for f in n.sae["top_features"][:5])
            lines.append(f"  SAE: L0 {n.sae['l0']}, rel. error {n.sae['relative_error']:.3f}, top features {feats}")
            if n.sae["features_driving_neuron"]:
                drivers = ", ".join(f"{f['index']} ({f['contribution']:+.3f})" for f in n.sae["features_driving_neuron"][:5])
                lines.append(f"  features driving the neuron: {drivers}")
            lines += [f"  ! {w}" for w in n.sae["warnings"]]
        p = n.patched
        ratio = f"{p['ratio']:.3f}" if p["ratio"] is not None else "n/a"
        lines.append(f"  patched activation at placeholder: {p['at_placeholder']:.4f}   reactivation ratio {ratio}")
        for name, c in n.controls.items():
            lines.append(f"    control {name:17s} {c['at_placeholder']:.4f}")
        lines.append(f"  verdict: {n.verdict}")
        lines.append(f"  generated: {p['generated_text']!r}")
    lines.append("")
    lines.append("timings (s): " + ", ".join(f"{k} {v}" for k, v in result.timings.items()))
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)
