"""The reference experiment, end to end: profile -> pick neurons -> extract -> SAE -> Patchscope.

Every input is checked before the model loads; the atlas in ``--out`` is reused (or resumed from its
checkpoint); ``results.json`` is written atomically at the end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from patchscope.atlas.atlas import Atlas, AtlasEntry, AtlasMeta
from patchscope.atlas.config import ProfileConfig
from patchscope.atlas.distributed import World
from patchscope.atlas.folder import Action, AtlasFolder, Plan, Policy, plan_before_loading
from patchscope.atlas.profiling import profile
from patchscope.atlas.sources import SourceConfig, TextSource
from patchscope.model.loading import (
    DEFAULT_MODEL,
    PRESETS,
    DeviceName,
    DTypeName,
    load_config,
    load_model,
    load_tokenizer,
    preset_for,
    resolve_device,
    resolve_dtype,
)
from patchscope.model.sites import parse_site
from patchscope.report.run_report import write_run_report
from patchscope.sae.attribution import attribute_neuron
from patchscope.sae.jumprelu import JumpReLUSAE, check_for_model, check_site, top_features
from patchscope.sae.loaders import load_sae, sae_spec_for_site
from patchscope.scope.config import PatchscopeConfig
from patchscope.scope.extract import Extraction, extract
from patchscope.scope.placeholder import PromptPlan, plan_prompt
from patchscope.scope.readout import NeuronTarget, read_neurons
from patchscope.util.lock import output_lock
from patchscope.util.signals import Interrupted
from patchscope.util.storage import check_writable, write_json
from patchscope.util.versions import versions

RESULTS = "results.json"


@dataclass(frozen=True)
class ExperimentConfig:
    """The run as a whole: model, output, which neurons, which SAE."""

    model: str = field(
        default=DEFAULT_MODEL, metadata={"help": f"HF hub id, preset name ({', '.join(PRESETS)}) or local directory."}
    )
    dtype: DTypeName = field(default="auto", metadata={"help": "auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16 or float16."})
    device: DeviceName = field(default="auto", metadata={"help": "auto (cuda when available, else cpu), cpu or cuda."})
    out: str = field(default="patchscope-out", metadata={"help": "Output directory: atlas, exports, results.json."})
    neuron: int | None = field(
        default=None, metadata={"help": "Neuron to study (default: the atlas's top neuron by maximum activation)."}
    )
    top_neurons: int = field(
        default=1, metadata={"help": "Sweep the N neurons with the largest maxima in one batched Patchscope run."}
    )
    sae: str | None = field(
        default=None,
        metadata={
            "help": "SAE spec (file, folder or REPO/PATH); default: the matching Gemma Scope residual SAE; 'none' skips it."
        },
    )
    sae_top_k: int = field(default=10, metadata={"help": "SAE features to report."})
    allow_site_mismatch: bool = field(
        default=False, metadata={"help": "Apply an SAE to a vector from a site it was not trained on (warns)."}
    )
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
    case: str = ""
    """What the reactivation can show: same_layer (by construction), earlier_target_layer (evidence) or later_target_layer."""
    decode: dict[str, Any] = field(default_factory=dict)
    """Decode relatedness: the generated tokens' overlap with the source context, patched against the random control."""


@dataclass
class ExperimentResult:
    """What `run_experiment` found; ``summary()`` reads it as text, ``to_json()`` is ``results.json``.

    Attributes:
        config: the `ExperimentConfig` as plain data.
        prompt: the target prompt, its tokens and the patched position.
        neurons: one `NeuronResult` per studied neuron: its top example, SAE read-out, patched
            activation, controls and verdict.
        timings: seconds per phase (load_model, profile, extract, sae, patchscope).
        versions: library versions of the run.
        atlas: where the atlas is, whether it was reused, and its size.
        notes: remarks on how the run went.
    """

    config: dict[str, Any]
    prompt: dict[str, Any]
    neurons: list[NeuronResult]
    timings: dict[str, float]
    versions: dict[str, str]
    atlas: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    key: str = ""
    """The run's settings as resolved (`_results_key`): a later run with the same key writes the same results file."""
    results_file: str = ""
    """Where this result was written: ``results.json``, or ``results-<settings>.json`` when
    ``results.json`` holds a run with other settings (earlier results are never overwritten)."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """The readable report: the original's "Experiment Results" block, plus the controls."""
        return format_summary(self)


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


@dataclass(frozen=True)
class _Checked:
    """What `_preflight` established before any model loads."""

    prompt: PromptPlan
    sae: JumpReLUSAE | None
    sae_note: str
    out: Path
    folder: Plan
    """What the run will do with the atlas folder ``out`` (`AtlasFolder.plan`)."""


def _preflight(config: ExperimentConfig) -> _Checked:
    """Everything that can be checked without model weights: sites, layer, neuron, prompt, SAE, data, output."""
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
    return _Checked(prompt, sae, sae_note, out, _plan_folder(config, out))


def _plan_folder(config: ExperimentConfig, out: Path) -> Plan:
    """Reuse a finished atlas of the same reading, resume this run's checkpoint, finish its exports, or start."""
    dtype = str(resolve_dtype(config.dtype, resolve_device(config.device))).removeprefix("torch.")
    profile_config = config.profile_config()
    # the source site only feeds the corpus-mean control, whose mean a reused atlas may lack (`_corpus_mean`)
    policy = Policy(resume=True, reuse=True, sites=profile_config.site_names(), optional_sites=(config.source_site,))
    return plan_before_loading(out, World(), config.model, TextSource(config.source), profile_config, dtype, policy)


def _load_matching_sae(config: ExperimentConfig, d_model: int):
    if config.sae and config.sae.lower() == "none":
        return None, "SAE read-out skipped (`sae` none)"
    spec = config.sae
    if spec is None:
        preset = preset_for(config.model)
        if preset is None or preset.sae_repo is None:
            return None, f"SAE read-out skipped: no default SAE for {config.model}; pass `sae` to read the vector"
        spec = sae_spec_for_site(config.model, config.source_site)
    sae = load_sae(spec)
    check_for_model(sae, d_model)
    check_site(sae, config.source_site, allow_site_mismatch=config.allow_site_mismatch)
    return sae, f"SAE {sae.info.source} (trained on {sae.info.site})"


def _profile_or_reuse(model, tokenizer, config: ExperimentConfig, checked: _Checked, timer: _Timer, progress: bool) -> Atlas:
    """Carry the folder's plan out (made again under the lock of ``out``, which another run may have changed)."""
    plan = _plan_folder(config, checked.out)
    if plan.action is Action.REUSE:
        return AtlasFolder(checked.out).load()
    with timer.phase("profile"):
        try:
            return profile(
                model,
                tokenizer,
                TextSource(config.source),
                config.profile_config(),
                out=checked.out,
                resume=plan.action is Action.RESUME,
                model_name=config.model,
                progress=progress,
            )
        except Interrupted as stop:
            stop.hint = "rerun the same command to continue from it"  # a run resumes from its checkpoint by itself
            raise


def _corpus_mean(
    model, tokenizer, config: ExperimentConfig, atlas: Atlas, timer: _Timer, progress: bool
) -> tuple[torch.Tensor | None, str | None]:
    """The mean of the source site over the corpus, first slots left out, for the corpus-mean control.

    A reused atlas made by ``patchscope profile`` may lack that site; then only its mean is
    recomputed (one pass up to the source site, nothing stored).
    """
    if config.source_site in atlas.sites:
        return atlas.mean_without_first_slots(config.source_site, model, tokenizer), None
    if not config.patchscope.controls:
        return None, None
    meta = atlas.meta
    only_mean = dataclasses.replace(  # first slots (BOS or an attention sink) never enter the mean
        config.profile,
        sites=(config.source_site,),
        top_k=1,
        max_length=meta.max_length,
        overflow=meta.overflow,
        exclude_bos=True,
        checkpoint_every=0,
    )
    with timer.phase("corpus_mean"):
        mean = profile(model, tokenizer, TextSource(config.source), only_mean, model_name=config.model, progress=progress)[
            config.source_site
        ].mean
    return mean.float(), f"the atlas has no {config.source_site}; its corpus mean was computed in this run"


def _extract_top(model, tokenizer, config: ExperimentConfig, atlas: Atlas) -> tuple[list[AtlasEntry], list[Extraction]]:
    """The studied neurons' top examples, and the source-site vector of each, recomputed from its text."""
    neurons = [config.neuron] if config.neuron is not None else atlas.top_neurons(config.neuron_site, config.top_neurons)
    entries = [atlas.entry(config.neuron_site, n) for n in neurons]
    texts = atlas.texts({e.doc for e in entries})
    extractions = [
        extract(
            model,
            tokenizer,
            texts[e.doc],
            site=config.source_site,
            position=e.position,
            entry=e,
            max_length=atlas.meta.max_length,
            overflow=atlas.meta.overflow,
        )
        for e in entries
    ]
    return entries, extractions


def _read_with_sae(
    model, config: ExperimentConfig, sae: JumpReLUSAE, entries: list[AtlasEntry], extractions: list[Extraction]
) -> list[dict[str, Any] | None]:
    """Each vector's SAE features, and the features that drive its neuron."""
    sae = sae.to(extractions[0].vector.device)
    results: list[dict[str, Any] | None] = []
    for entry, ex in zip(entries, extractions):
        readout = top_features(sae, ex.vector, config.sae_top_k, position=ex.position)
        attribution = attribute_neuron(
            model,
            sae,
            torch.tensor([ex.segment_ids], device=ex.vector.device),
            ex.local_position,
            ex.vector,
            site=config.source_site,
            neuron=entry.neuron,
            neuron_site=config.neuron_site,
            allow_site_mismatch=config.allow_site_mismatch,
        )
        results.append(
            {
                "sae": sae.info.source,
                "sae_site": sae.info.site,
                "l0": readout.l0,
                "relative_error": readout.relative_error,
                "cosine": readout.cosine,
                "top_features": [dataclasses.asdict(f) for f in readout.features],
                "warnings": readout.warnings,
                "features_driving_neuron": [dataclasses.asdict(f) for f in attribution.features[: config.sae_top_k]],
            }
        )
    return results


def _atlas_record(meta: AtlasMeta) -> dict[str, Any]:
    """The atlas's provenance, as results.json lists it."""
    return {
        **dataclasses.asdict(meta.provenance),
        "fingerprint": meta.fingerprint,
        "identity": meta.inputs.to_json(),
        "source": dataclasses.asdict(meta.source) if meta.source else None,
        "rows_read": list(meta.rows_read) if meta.rows_read else None,
    }


def _results_key(config: ExperimentConfig, folder: Plan) -> str:
    """Which results a run gives: its atlas's reading (`RunKey.reading_digest`) and the experiment's own settings, resolved."""
    own = {
        k: v for k, v in dataclasses.asdict(config).items() if k not in ("out", "source", "profile", "dtype", "device", "model")
    }
    payload = {
        "atlas": folder.key.reading_digest,
        "sites": (config.neuron_site, config.source_site, config.target_site),
        "device": str(resolve_device(config.device)),
        "experiment": own,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _results_path(out: Path, key: str) -> Path:
    """``results.json``, unless it holds a run with other settings: then ``results-<key>.json``."""
    default = out / RESULTS
    try:
        earlier = json.loads(default.read_text(encoding="utf-8")).get("key")
    except (OSError, ValueError, AttributeError):
        earlier = None
    return default if not default.exists() or earlier == key else out / f"results-{key[:10]}.json"


def run_experiment(config: ExperimentConfig, *, progress: bool = True) -> ExperimentResult:
    """Profile, pick neurons, extract their vectors, read them with the SAE, patch them into the prompt.

    Every input is checked before the model loads. An atlas already in ``config.out`` with the same
    settings is reused; ``results.json`` is written there at the end.
    ``out`` is locked for the run: a second run on the same folder is refused.

    Args:
        config: model, data, profile, SAE and Patchscope settings (`ExperimentConfig`).
        progress: show progress bars.

    Returns:
        An `ExperimentResult`; ``result.summary()`` is the readable report.

    Example:
        >>> config = ExperimentConfig(model="./my-model", out="run", source=SourceConfig(dataset="notes.txt", split=""))
        >>> print(run_experiment(config).summary())
    """
    timer = _Timer()
    with timer.phase("prepare"):  # checks every input; includes a GGUF model's one-time conversion
        checked = _preflight(config)
    with output_lock(checked.out):
        return _run_locked(config, checked, timer, progress)


def _run_locked(config: ExperimentConfig, checked: _Checked, timer: _Timer, progress: bool) -> ExperimentResult:
    prompt, sae, out = checked.prompt, checked.sae, checked.out
    notes = [checked.sae_note]
    with timer.phase("load_model"):
        model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    atlas = _profile_or_reuse(model, tokenizer, config, checked, timer, progress)
    reused = checked.folder.action is Action.REUSE
    notes.append("atlas reused from `out`" if reused else "atlas profiled in this run")
    with timer.phase("extract"):
        entries, extractions = _extract_top(model, tokenizer, config, atlas)
    sae_results: list[dict[str, Any] | None] = [None] * len(entries)
    if sae is not None:
        with timer.phase("sae"):
            sae_results = _read_with_sae(model, config, sae, entries, extractions)

    mean, mean_note = _corpus_mean(model, tokenizer, config, atlas, timer, progress)
    notes += [mean_note] if mean_note else []
    with timer.phase("patchscope"):
        readouts = read_neurons(
            model,
            tokenizer,
            prompt,
            [
                NeuronTarget(e.neuron, e.activation, ex.vector, ex.segment_ids, ex.local_position, key=(e.doc, e.position))
                for e, ex in zip(entries, extractions)
            ],
            target_site=config.target_site,
            neuron_site=config.neuron_site,
            config=config.patchscope,
            mean=mean,
        )

    results = [
        NeuronResult(
            neuron=entry.neuron,
            max_activation=entry.activation,
            source={
                "doc": entry.doc,
                "position": entry.position,
                "token": ex.token,
                "context": ex.context,
                "site": config.source_site,
                "recomputed_activation": ex.activation,
                "vector_norm": float(ex.vector.float().norm()),
            },
            sae=sae_results[i],
            patched=dataclasses.asdict(readout.patched),
            controls={k: dataclasses.asdict(v) for k, v in readout.controls.items()},
            verdict=readout.verdict,
            case=readout.case.value,
            decode=dataclasses.asdict(readout.decode),
        )
        for i, (entry, ex, readout) in enumerate(zip(entries, extractions, readouts))
    ]
    result = ExperimentResult(
        config=_jsonable(config),
        prompt={
            "text": config.patchscope.prompt,
            "tokens": prompt.tokens,
            "position": prompt.position,
            "token": prompt.tokens[prompt.position],
        },
        neurons=results,
        timings=timer.phases,
        versions=versions(),
        atlas={
            "path": str(out),
            "reused": reused,
            "n_tokens": atlas.n_tokens,
            "n_documents": atlas.meta.n_documents,
            **_atlas_record(atlas.meta),
        },
        notes=notes,
        key=_results_key(config, checked.folder),
    )
    path = _results_path(out, result.key)
    result.results_file = str(path)
    if path.name != RESULTS:
        result.notes.append(f"{out / RESULTS} holds a run with other settings; this run's results are in {path.name}")
    write_json(path, result.to_json())
    write_run_report(result.to_json(), path.with_name(path.stem.replace("results", "report", 1) + ".html"), model, tokenizer)
    return result


def _jsonable(config: ExperimentConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _rows(rows: list[int] | None) -> str:
    return f" rows {rows[0]}-{rows[1]}" if rows else ""


def format_summary(result: ExperimentResult) -> str:
    """The original's "Experiment Results" block, plus the controls."""
    cfg = result.config
    lines = [
        "=== Experiment Results ===",
        f"model {cfg['model']}   layer {cfg['profile']['layer']}   data {cfg['source']['dataset']}{_rows(result.atlas.get('rows_read'))}"
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
        verdict, _, decode = n.verdict.partition("; ")
        lines.append(f"  verdict: {verdict}")
        lines.append(f"  decode: {decode}")
        lines.append(f"  generated: {p['generated_text']!r}")
    lines.append("")
    lines.append("timings (s): " + ", ".join(f"{k} {v}" for k, v in result.timings.items()))
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)
