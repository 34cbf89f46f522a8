"""The reference experiment, end to end: profile -> pick neurons -> extract -> SAE -> Patchscope.

Every input is checked before the model loads; the atlas in ``--out`` is reused (or resumed from its
checkpoint); ``results.json`` is written atomically at the end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from patchscope.atlas.atlas import Atlas, AtlasEntry, AtlasMeta, SiteNeuron
from patchscope.atlas.distributed import World
from patchscope.atlas.feature_site import FeatureSite
from patchscope.atlas.folder import Action, AtlasFolder, Plan, Policy, plan_before_loading
from patchscope.atlas.layer_selection import parse_layers
from patchscope.atlas.profile_config import ProfileConfig
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
from patchscope.report.feature_pages import profiled_as, write_feature_pages
from patchscope.report.run_report import write_run_report
from patchscope.sae.attribution import FeatureContribution, attribute_neuron
from patchscope.sae.features import feature_site
from patchscope.sae.jumprelu import FeatureHit, JumpReLUSAE, SAEError, check_for_model, check_site, top_features
from patchscope.sae.loaders import load_sae, sae_spec_for_site
from patchscope.scope.config import PatchscopeConfig
from patchscope.scope.controls import Case
from patchscope.scope.extract import Extraction, extract
from patchscope.scope.inject import Observation
from patchscope.scope.placeholder import PromptPlan, plan_prompt
from patchscope.scope.readout import NeuronReadout, NeuronTarget, read_neurons
from patchscope.scope.verdict import DecodeRelatedness, case_explanation, reactivation_text
from patchscope.util.lock import output_lock
from patchscope.util.signals import Interrupted
from patchscope.util.storage import check_writable, write_json
from patchscope.util.versions import versions

RESULTS = "results.json"

Pick = Literal["per-layer", "overall"]
"""Which neurons a run over several layers studies (`pick_neurons`)."""


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
    pick: Pick = field(
        default="per-layer",
        metadata={
            "help": "With --layers: study the --top-neurons neurons of each layer (per-layer), or the --top-neurons "
            "with the largest maxima over all the layers together (overall). Each neuron's vector is read and written "
            "at its own layer's hook_resid_pre, and the neuron read at its own layer. Without --layers there is one "
            "layer, and both give the same neurons. See docs/whole-model.md."
        },
    )
    sae: str | None = field(
        default=None,
        metadata={
            "help": "SAE spec (file, folder or REPO/PATH); default: the matching Gemma Scope residual SAE; 'none' skips it."
        },
    )
    sae_top_k: int = field(default=10, metadata={"help": "SAE features to report."})
    profile_features: bool = field(
        default=False,
        metadata={
            "help": "Also profile the SAE's features in the run's one pass; the vector's top features then link to "
            "their atlas pages (dashboard/ in the output directory). See docs/gemma-scope-2.md."
        },
    )
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
        """The profile also records the source sites, whose means are the corpus-mean controls."""
        runs = self.layer_runs()
        own = (*(run.neuron_site for run in runs), *(run.source_site for run in runs))
        return dataclasses.replace(self.profile, layers="", sites=tuple(dict.fromkeys((*own, *self.profile.sites))))

    # -- a run over several layers (`profile.layers`): each layer is studied as a single-layer run of its own

    def for_model(self, n_layers: int) -> ExperimentConfig:
        """This config with `profile.layers` written out as a list (``all`` expanded) for a model of
        ``n_layers`` blocks, and checked against it; unchanged without `profile.layers`."""
        if not self.profile.layers:
            return self
        layers = ",".join(map(str, parse_layers(self.profile.layers, n_layers)))
        return dataclasses.replace(self, profile=dataclasses.replace(self.profile, layers=layers))

    def layer_runs(self) -> tuple[ExperimentConfig, ...]:
        """One single-layer config per studied layer: this config itself without `profile.layers`; else, for
        each layer L of them (after `for_model`), the MLP neurons of L with the vector read and written at
        ``blocks.L.hook_resid_pre``."""
        if not self.profile.layers:
            return (self,)
        default_sites = dataclasses.replace(self.patchscope, source_site=None, target_site=None)
        return tuple(
            dataclasses.replace(
                self, profile=dataclasses.replace(self.profile, layer=layer, layers="", sites=()), patchscope=default_sites
            )
            for layer in parse_layers(self.profile.layers)
        )


@dataclass
class SourceToken:
    """Where a neuron fired most, and the vector read there."""

    doc: int
    """Absolute row index of the document."""
    position: int
    """Position in the document (BOS = 0)."""
    token: str
    context: str
    """The text around the token (+-5 tokens)."""
    site: str
    """Where the vector was read (the source site)."""
    recomputed_activation: float | None
    """The neuron at the token when the document is run again: the atlas value, reproduced."""
    vector_norm: float


@dataclass
class SAEResult:
    """What the SAE says about the vector, and which of its features drive the neuron."""

    sae: str
    sae_site: str | None
    """The site the SAE was trained on (None: not recorded)."""
    l0: int
    relative_error: float
    cosine: float
    top_features: list[FeatureHit]
    warnings: list[str]
    features_driving_neuron: list[FeatureContribution]
    feature_pages: dict[str, str] = field(default_factory=dict)
    """``{feature index: its atlas page, relative to out}`` where the atlas profiled this SAE (`patchscope.report.feature_pages`)."""


@dataclass
class NeuronResult:
    """One studied neuron: its strongest token, the SAE read-out, the Patchscope run and what it shows."""

    neuron: int
    site: str
    """The neuron's site, ``blocks.L.mlp.hook_post``."""
    layer: int
    """The layer the neuron belongs to: its vector was read and written, and the neuron read, at this layer."""
    max_activation: float
    source: SourceToken
    sae: SAEResult | None
    patched: Observation
    controls: dict[str, Observation]
    """By control name, in the order they ran."""
    verdict: str
    case: str
    """What the reactivation can show: same_layer (by construction), earlier_target_layer (evidence) or later_target_layer."""
    decode: DecodeRelatedness
    """Whether the generation carries the source token's string, against the controls' (`patchscope.scope.verdict`)."""


@dataclass
class PromptRecord:
    """The target prompt and where the vector is written."""

    text: str
    tokens: list[str]
    position: int
    token: str


@dataclass
class AtlasRecord:
    """The atlas a run used: where it is, whether it was reused, and what made it."""

    path: str
    reused: bool
    n_tokens: int
    meta: AtlasMeta

    def to_json(self) -> dict[str, Any]:
        meta = self.meta
        return {
            "path": self.path,
            "reused": self.reused,
            "n_tokens": self.n_tokens,
            "n_documents": meta.n_documents,
            **dataclasses.asdict(meta.provenance),
            "fingerprint": meta.fingerprint,
            "identity": meta.inputs.to_json(),
            "source": dataclasses.asdict(meta.source) if meta.source else None,
            "rows_read": list(meta.rows_read) if meta.rows_read else None,
        }


@dataclass
class ExperimentResult:
    """What `run_experiment` found; ``summary()`` reads it as text, ``to_json()`` is ``results.json``.

    Attributes:
        config: the `ExperimentConfig` of the run.
        prompt: the target prompt, its tokens and the patched position.
        neurons: one `NeuronResult` per studied neuron: its top example, SAE read-out, patched
            activation, controls and verdict.
        timings: seconds per phase (load_model, profile, extract, sae, patchscope).
        versions: library versions of the run.
        atlas: where the atlas is, whether it was reused, and what made it.
        notes: remarks on how the run went.
    """

    config: ExperimentConfig
    prompt: PromptRecord
    neurons: list[NeuronResult]
    timings: dict[str, float]
    versions: dict[str, str]
    atlas: AtlasRecord
    notes: list[str] = field(default_factory=list)
    key: str = ""
    """The run's settings as resolved (`_results_key`): a later run with the same key writes the same results file."""
    results_file: str = ""
    """Where this result was written: ``results.json``, or ``results-<settings>.json`` when
    ``results.json`` holds a run with other settings (earlier results are never overwritten)."""
    report_file: str = ""
    """Its page: ``report.html`` (or ``report-<settings>.html``) beside the results file."""

    def to_json(self) -> dict[str, Any]:
        """``results.json``: plain data, the atlas's record flattened."""
        return {
            "config": dataclasses.asdict(self.config),
            "prompt": dataclasses.asdict(self.prompt),
            "sites": _sites_json(self.config),
            "neurons": [dataclasses.asdict(n) for n in self.neurons],
            "timings": self.timings,
            "versions": self.versions,
            "atlas": self.atlas.to_json(),
            "notes": self.notes,
            "key": self.key,
            "results_file": self.results_file,
            "report_file": self.report_file,
        }

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
    sae_sites: tuple[str, ...] = ()
    """The source sites whose vectors `sae` reads (every studied layer's, or over several layers those it was trained on)."""
    features: tuple[FeatureSite, ...] = ()
    """The SAE's features, when the run profiles them (`ExperimentConfig.profile_features`)."""


def _preflight(config: ExperimentConfig) -> _Checked:
    """Everything that can be checked without model weights: sites, layer, neuron, prompt, SAE, data, output."""
    config.patchscope.validate()
    config.profile.validate()
    if config.top_neurons < 1:
        raise ValueError(f"`top_neurons` must be at least 1, got {config.top_neurons}")
    _check_layer_picks(config)
    model_config = load_config(config.model)
    n_layers = model_config.num_hidden_layers
    for run in config.layer_runs():
        for site in (run.source_site, run.target_site, run.neuron_site):
            layer, _ = parse_site(site)
            if not -1 <= layer < n_layers:
                raise ValueError(f"site {site}: layer {layer} is out of range, the model has layers 0..{n_layers - 1}")
    if config.neuron is not None and not 0 <= config.neuron < model_config.intermediate_size:
        raise IndexError(f"`neuron` {config.neuron} is out of range: the MLP has neurons 0..{model_config.intermediate_size - 1}")
    prompt = plan_prompt(load_tokenizer(config.model), config.patchscope)
    if config.profile.layers:
        sae, sae_note, sae_sites = _load_layers_sae(config, model_config.hidden_size)
    else:
        sae, sae_note = _load_matching_sae(config, model_config.hidden_size)
        sae_sites = (config.source_site,) if sae is not None else ()
    features = _features_to_profile(config, sae)
    out = check_writable(config.out)
    return _Checked(prompt, sae, sae_note, out, _plan_folder(config, out, features), sae_sites, features)


def _check_layer_picks(config: ExperimentConfig) -> None:
    """What a run over several layers (`profile.layers`) cannot do, refused before the model loads."""
    if config.pick not in get_args(Pick):
        raise ValueError(f"`pick` must be one of {', '.join(get_args(Pick))}; got {config.pick!r}")
    if not config.profile.layers:
        return
    if config.patchscope.source_site or config.patchscope.target_site:
        raise ValueError(
            "`source_site` and `target_site` name one layer; with `layers` each neuron's vector is read and written at "
            "its own layer's hook_resid_pre (docs/whole-model.md)"
        )
    if config.profile.site_kind != "mlp.hook_post":
        raise ValueError(
            f"`run` studies MLP neurons, so with `layers` the `site_kind` is mlp.hook_post, not {config.profile.site_kind}; "
            "add other sites with `sites`, or profile them with `patchscope profile`"
        )
    if config.neuron is not None and config.pick == "overall":
        raise ValueError("`neuron` names one index to study at every layer: use it with `pick` per-layer")


def _load_layers_sae(config: ExperimentConfig, d_model: int) -> tuple[JumpReLUSAE | None, str, tuple[str, ...]]:
    """Over several layers an SAE reads the vectors of the layer it was trained on; none is chosen by default."""
    if config.sae is None or config.sae.lower() == "none":
        why = "(`sae` none)" if config.sae else "over several layers: pass `sae` to read the vectors of its layer"
        return None, f"SAE read-out skipped {why}", ()
    sae = load_sae(config.sae)
    check_for_model(sae, d_model)
    sources = [run.source_site for run in config.layer_runs()]
    reads = tuple(site for site in sources if _sae_reads(sae, site, config.allow_site_mismatch))
    if not reads:
        raise SAEError(
            f"the SAE was trained on {sae.info.site}, and no studied layer's vector comes from there ({', '.join(sources)}); "
            "for the vector at blocks.L.hook_resid_pre use the layer L-1 residual SAE, or set `allow_site_mismatch`"
        )
    others = "" if len(reads) == len(sources) else "; the other layers' neurons have no SAE read-out"
    return sae, f"SAE {sae.info.source} (trained on {sae.info.site}) reads the vectors of {', '.join(reads)}{others}", reads


def _sae_reads(sae: JumpReLUSAE, site: str, allow_site_mismatch: bool) -> bool:
    """Whether `check_site` lets ``sae`` read the vector at ``site`` (an SAE no site can feed is refused)."""
    try:
        check_site(sae, site, allow_site_mismatch=allow_site_mismatch)
    except SAEError:
        if sae.info.unreadable:
            raise
        return False
    return True


def _plan_folder(config: ExperimentConfig, out: Path, features: tuple[FeatureSite, ...] = ()) -> Plan:
    """Reuse a finished atlas of the same reading, resume this run's checkpoint, finish its exports, or start."""
    dtype = str(resolve_dtype(config.dtype, resolve_device(config.device))).removeprefix("torch.")
    profile_config = config.profile_config()
    # the source site only feeds the corpus-mean control, whose mean a reused atlas may lack (`_corpus_means`)
    optional = tuple(run.source_site for run in config.layer_runs())
    sites = (*profile_config.site_names(), *(f.name for f in features))
    policy = Policy(resume=True, reuse=True, sites=sites, optional_sites=optional)
    source = TextSource(config.source)
    return plan_before_loading(out, World(), config.model, source, profile_config, dtype, policy, features=features)


def _features_to_profile(config: ExperimentConfig, sae: JumpReLUSAE | None) -> tuple[FeatureSite, ...]:
    """``profile_features``: the SAE's features, a site of the run's one profiling pass."""
    if not config.profile_features:
        return ()
    if sae is None:
        raise ValueError("`profile_features` profiles the SAE's features: pass `sae` (this run has none)")
    return (feature_site(sae, site=sae.info.site or config.source_site),)


def _load_matching_sae(config: ExperimentConfig, d_model: int):
    if config.sae and config.sae.lower() == "none":
        return None, "SAE read-out skipped (`sae` none)"
    spec = config.sae
    if spec is None:
        preset = preset_for(config.model)
        if preset is None or preset.sae_repo is None:
            return None, f"SAE read-out skipped: no default SAE for {config.model}; pass `sae` to read the vector"
        try:  # the default SAE is a convenience: where there is none, or offline, say what it would read
            spec = sae_spec_for_site(config.model, config.source_site)
        except SAEError as error:
            return None, f"SAE read-out skipped: {error}"
        try:
            sae = load_sae(spec)
        except SAEError as error:
            if not str(error).startswith("could not fetch"):
                raise
            return None, f"SAE read-out skipped: {error}; once downloaded, pass `sae` to read the vector"
    else:
        sae = load_sae(spec)
    check_for_model(sae, d_model)
    check_site(sae, config.source_site, allow_site_mismatch=config.allow_site_mismatch)
    return sae, f"SAE {sae.info.source} (trained on {sae.info.site})"


def _profile_or_reuse(
    model, tokenizer, config: ExperimentConfig, checked: _Checked, timer: _Timer, progress: bool
) -> tuple[Atlas, Plan]:
    """Carry the folder's plan out, made again under the lock of ``out`` (another run may have changed it)."""
    plan = _plan_folder(config, checked.out, checked.features)
    if plan.action is Action.REUSE:
        return AtlasFolder(checked.out).load(), plan
    with timer.phase("profile"):
        try:
            atlas = profile(
                model,
                tokenizer,
                TextSource(config.source),
                config.profile_config(),
                out=checked.out,
                resume=plan.action is Action.RESUME,
                model_name=config.model,
                progress=progress,
                features=checked.features,
            )
        except Interrupted as stop:
            stop.hint = "rerun the same command to continue from it"  # a run resumes from its checkpoint by itself
            raise
    return atlas, plan


def _corpus_means(
    model, tokenizer, config: ExperimentConfig, atlas: Atlas, timer: _Timer, progress: bool
) -> tuple[dict[str, torch.Tensor | None], str | None]:
    """Each studied layer's source-site mean over the corpus, first slots left out, for the corpus-mean control.

    A reused atlas made by ``patchscope profile`` may lack those sites; then only their means are
    recomputed (one pass up to the deepest of them, nothing stored).
    """
    sites = list(dict.fromkeys(run.source_site for run in config.layer_runs()))
    means: dict[str, torch.Tensor | None] = {
        site: atlas.mean_without_first_slots(site, model, tokenizer) for site in sites if site in atlas.sites
    }
    missing = tuple(site for site in sites if site not in atlas.sites)
    if not missing or not config.patchscope.controls:
        return {**means, **dict.fromkeys(missing)}, None
    meta = atlas.meta
    only_mean = dataclasses.replace(  # first slots (BOS or an attention sink) never enter the mean
        config.profile,
        sites=missing,
        layers="",
        top_k=1,
        max_length=meta.max_length,
        overflow=meta.overflow,
        exclude_bos=True,
        checkpoint_every=0,
    )
    with timer.phase("corpus_mean"):
        found = profile(model, tokenizer, TextSource(config.source), only_mean, model_name=config.model, progress=progress)
    means.update({site: found[site].mean.float() for site in missing})
    one = len(missing) == 1
    return (
        means,
        f"the atlas has no {', '.join(missing)}; {'its corpus mean was' if one else 'their corpus means were'} computed in this run",
    )


def _extract_top(
    model, tokenizer, config: ExperimentConfig, atlas: Atlas, neurons: list[int]
) -> tuple[list[AtlasEntry], list[Extraction], dict[int, str]]:
    """The neurons' top examples, the source-site vector of each recomputed from its text, and the texts
    (``config``: a single-layer run, `ExperimentConfig.layer_runs`)."""
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
    return entries, extractions, texts


def _read_with_sae(
    model, config: ExperimentConfig, sae: JumpReLUSAE, entries: list[AtlasEntry], extractions: list[Extraction]
) -> list[SAEResult | None]:
    """Each vector's SAE features, and the features that drive its neuron."""
    sae = sae.to(extractions[0].vector.device)
    results: list[SAEResult | None] = []
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
        features = attribution.features[: config.sae_top_k]
        results.append(
            SAEResult(
                sae.info.source,
                sae.info.site,
                readout.l0,
                readout.relative_error,
                readout.cosine,
                readout.features,
                readout.warnings,
                features,
            )
        )
    return results


def _link_feature_pages(model, tokenizer, config: ExperimentConfig, atlas: Atlas, checked: _Checked, results) -> None:
    """Where the atlas profiled the run's SAE, the listed features' atlas pages (`patchscope.report.feature_pages`)."""
    sae = checked.sae
    if sae is None or not atlas.meta.features:
        return
    feature = profiled_as(
        atlas, checked.features[0] if checked.features else feature_site(sae, site=sae.info.site or config.source_site)
    )
    if feature is None:
        return
    listed = [[f.index for f in (*r.top_features, *r.features_driving_neuron)] if r else [] for r in results]
    pages = write_feature_pages(
        atlas, checked.out, feature, {i for indices in listed for i in indices}, model=model, tokenizer=tokenizer
    )
    for result, indices in zip(results, listed):
        if result is not None:
            result.feature_pages = {str(i): pages[i] for i in indices}


def _results_key(config: ExperimentConfig, folder: Plan) -> str:
    """Which results a run gives: its atlas's reading (`RunKey.reading_digest`) and the experiment's own settings, resolved."""
    own = {
        k: v for k, v in dataclasses.asdict(config).items() if k not in ("out", "source", "profile", "dtype", "device", "model")
    }
    if not config.profile.layers:
        del own["pick"]  # one layer: both picks study the same neurons, and the key stays what it was before `pick`
    runs = config.layer_runs()
    payload = {
        "atlas": folder.key.reading_digest,
        "inputs": folder.key.inputs.to_json(),  # two local models or corpora of the same settings differ here
        "sites": [(run.neuron_site, run.source_site, run.target_site) for run in runs]
        if config.profile.layers
        else (config.neuron_site, config.source_site, config.target_site),
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
        if config.profile.layers:  # every layer profiled in one pass, its neurons picked by `pick` (docs/whole-model.md)
            config.profile.validate()
            config = config.for_model(load_config(config.model).num_hidden_layers)
        checked = _preflight(config)
    with output_lock(checked.out):
        return _run_locked(config, checked, timer, progress)


def _run_locked(config: ExperimentConfig, checked: _Checked, timer: _Timer, progress: bool) -> ExperimentResult:
    notes = [checked.sae_note]
    with timer.phase("load_model"):
        model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    atlas, plan = _profile_or_reuse(model, tokenizer, config, checked, timer, progress)
    reused = plan.action is Action.REUSE
    notes.append("atlas reused from `out`" if reused else "atlas profiled in this run")
    neurons, texts, study_notes = _study_layers(model, tokenizer, config, checked, atlas, timer, progress)
    notes += study_notes
    result = ExperimentResult(
        config=config,
        prompt=PromptRecord(
            config.patchscope.prompt,
            checked.prompt.tokens,
            checked.prompt.position,
            checked.prompt.tokens[checked.prompt.position],
        ),
        neurons=neurons,
        timings=timer.phases,
        versions=versions(),
        atlas=AtlasRecord(str(checked.out), reused, atlas.n_tokens, atlas.meta),
        notes=notes,
        key=_results_key(config, plan),
    )
    _write_results(result, checked.out, model, tokenizer, texts)
    return result


def pick_neurons(atlas: Atlas, sites: Sequence[str], n: int, pick: Pick = "per-layer") -> list[SiteNeuron]:
    """The neurons a run studies: the ``n`` with the largest maxima of each site, sites in the order given
    (per-layer), or the ``n`` largest over all the sites together (overall, `Atlas.top_neurons_across`).
    Best first within a site; ties go to the lower index."""
    if pick == "overall":
        return atlas.top_neurons_across(n, sites)
    return [SiteNeuron(site, neuron, float(atlas[site].max[neuron])) for site in sites for neuron in atlas.top_neurons(site, n)]


def _study_layers(
    model, tokenizer, config: ExperimentConfig, checked: _Checked, atlas: Atlas, timer: _Timer, progress: bool
) -> tuple[list[NeuronResult], dict[int, str], list[str]]:
    """Pick the neurons, then study each layer's as a single-layer run of that layer (`ExperimentConfig.layer_runs`):
    extract, read with the SAE, patch (one batched run per layer). Results in the order of the pick."""
    runs = {run.neuron_site: run for run in config.layer_runs()}
    if config.neuron is not None:
        picked = [SiteNeuron(site, config.neuron, float(atlas[site].max[config.neuron])) for site in runs]
    else:
        picked = pick_neurons(atlas, list(runs), config.top_neurons, config.pick)
    chosen = {site: [p.neuron for p in picked if p.site == site] for site in runs}
    chosen = {site: neurons for site, neurons in chosen.items() if neurons}
    found: dict[str, tuple[list[AtlasEntry], list[Extraction]]] = {}
    texts: dict[int, str] = {}
    with timer.phase("extract"):
        for site, neurons in chosen.items():
            entries, extractions, its_texts = _extract_top(model, tokenizer, runs[site], atlas, neurons)
            found[site] = entries, extractions
            texts.update(its_texts)
    sae: dict[str, list[SAEResult | None]] = {site: [None] * len(neurons) for site, neurons in chosen.items()}
    if checked.sae is not None:
        with timer.phase("sae"):
            for site in chosen:
                if runs[site].source_site in checked.sae_sites:
                    sae[site] = _read_with_sae(model, runs[site], checked.sae, *found[site])
                    _link_feature_pages(model, tokenizer, runs[site], atlas, checked, sae[site])
    means, mean_note = _corpus_means(model, tokenizer, config, atlas, timer, progress)
    results: dict[str, list[NeuronResult]] = {}
    with timer.phase("patchscope"):
        for site in chosen:
            run = runs[site]
            readouts = _patchscope(model, tokenizer, run, checked.prompt, *found[site], means[run.source_site])
            results[site] = [_neuron_result(run, *parts) for parts in zip(*found[site], sae[site], readouts)]
    ordered = [results[p.site][chosen[p.site].index(p.neuron)] for p in picked]
    return ordered, texts, [mean_note] if mean_note else []


def _patchscope(
    model, tokenizer, config: ExperimentConfig, prompt: PromptPlan, entries: list[AtlasEntry], extractions: list[Extraction], mean
) -> list[NeuronReadout]:
    """Every neuron's vector written into the prompt, with its controls, in one batched run."""
    targets = [
        NeuronTarget(e.neuron, e.activation, ex.vector, ex.segment_ids, ex.local_position, key=(e.doc, e.position))
        for e, ex in zip(entries, extractions)
    ]
    return read_neurons(
        model,
        tokenizer,
        prompt,
        targets,
        target_site=config.target_site,
        neuron_site=config.neuron_site,
        config=config.patchscope,
        mean=mean,
    )


def _neuron_result(
    config: ExperimentConfig, entry: AtlasEntry, ex: Extraction, sae: SAEResult | None, readout: NeuronReadout
) -> NeuronResult:
    source = SourceToken(
        entry.doc, entry.position, ex.token, ex.context, config.source_site, ex.activation, float(ex.vector.float().norm())
    )
    return NeuronResult(
        neuron=entry.neuron,
        site=config.neuron_site,
        layer=config.profile.layer,
        max_activation=entry.activation,
        source=source,
        sae=sae,
        patched=readout.patched,
        controls=readout.controls,
        verdict=readout.verdict,
        case=readout.case.value,
        decode=readout.decode,
    )


def _write_results(result: ExperimentResult, out: Path, model, tokenizer, texts: dict[int, str]) -> None:
    """``results.json`` (or ``results-<key>.json`` beside another run's) and its ``report.html``."""
    path = _results_path(out, result.key)
    result.results_file = str(path)
    if path.name != RESULTS:
        result.notes.append(f"{out / RESULTS} holds a run with other settings; this run's results are in {path.name}")
    result.report_file = str(path.with_name(path.stem.replace("results", "report", 1) + ".html"))
    data = result.to_json()
    write_json(path, data)
    write_run_report(data, result.report_file, model, tokenizer, texts)


def _sites_json(config: ExperimentConfig) -> dict[str, Any]:
    """``results.json``'s ``sites``: the run's three sites; over several layers, their pattern, ``L`` being
    each neuron's own ``layer``, and the layers and pick."""
    if not config.profile.layers:
        return {"source": config.source_site, "target": config.target_site, "neuron": config.neuron_site}
    layers = [run.profile.layer for run in config.layer_runs()]
    pattern = {"source": "blocks.L.hook_resid_pre", "target": "blocks.L.hook_resid_pre", "neuron": "blocks.L.mlp.hook_post"}
    return {**pattern, "layers": layers, "pick": config.pick}


def _rows(rows: tuple[int, int] | None) -> str:
    return f" rows {rows[0]}-{rows[1]}" if rows else ""


def format_summary(result: ExperimentResult) -> str:
    """The original's "Experiment Results" block, plus the controls."""
    cfg, meta, prompt = result.config, result.atlas.meta, result.prompt
    sites, several = _sites_json(cfg), bool(cfg.profile.layers)
    layers = f"layers {','.join(map(str, sites['layers']))} ({cfg.pick})" if several else f"layer {cfg.profile.layer}"
    lines = [
        "=== Experiment Results ===",
        f"model {cfg.model}   {layers}   data {cfg.source.dataset}{_rows(meta.rows_read)}"
        f"   {meta.n_documents} documents, {result.atlas.n_tokens} tokens",
        f"prompt {prompt.text!r}: vector written at position {prompt.position} ({prompt.token!r})",
    ]
    for case in dict.fromkeys(Case(n.case) for n in result.neurons):  # said once, not per neuron
        lines.append(f"{case.description}: {case_explanation(case, sites['target'], sites['neuron'])}")
    for n in result.neurons:
        lines += ["", *_neuron_lines(n, several)]
    lines.append("")
    if result.neurons:
        lines.append(f"decode: {result.neurons[0].decode.measure_text}")
    lines.append("timings (s): " + ", ".join(f"{k} {v}" for k, v in result.timings.items()))
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)


def _neuron_lines(n: NeuronResult, with_layer: bool = False) -> list[str]:
    src, p = n.source, n.patched
    name = f"layer {n.layer} neuron {n.neuron}" if with_layer else f"neuron {n.neuron}"
    lines = [
        f"{name}: max activation {n.max_activation:.4f} on {src.token!r} (document {src.doc}, position {src.position})",
        f"  context: {src.context!r}",
    ]
    if n.sae:
        feats = ", ".join(f"{f.index} ({f.activation:.2f})" for f in n.sae.top_features[:5])
        lines.append(f"  SAE: L0 {n.sae.l0}, rel. error {n.sae.relative_error:.3f}, top features {feats}")
        if n.sae.features_driving_neuron:
            drivers = ", ".join(f"{f.index} ({f.contribution:+.3f})" for f in n.sae.features_driving_neuron[:5])
            lines.append(f"  features driving the neuron: {drivers}")
        lines += [f"  ! {w}" for w in n.sae.warnings]
    ratio = f"{p.ratio:.3f}" if p.ratio is not None else "n/a"
    lines.append(f"  patched activation at placeholder: {p.at_placeholder:.4f}   reactivation ratio {ratio}")
    lines += [f"    control {name:17s} {c.at_placeholder:.4f}" for name, c in n.controls.items()]
    reactivation = reactivation_text(p.at_placeholder, {name: c.at_placeholder for name, c in n.controls.items()})
    decode = n.verdict.partition("; ")[2]
    lines += [
        f"  verdict: {Case(n.case).description}; {reactivation}",
        f"  decode: {decode}",
        f"  generated: {p.generated_text!r}",
    ]
    return lines
