"""Experiment configuration: pydantic models, TOML files and ``--set key=value`` overrides.

Every invalid key or value becomes a :class:`ConfigError` whose message is one line naming the
field and the allowed values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flsec.errors import ConfigError


class _Section(BaseModel):
    """Strict: ``rounds = true`` or ``rounds = 2.0`` is an error, not 1 or 2; ``nan`` and ``inf`` are refused."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


def _registered(kind: str, name: str) -> str:
    from flsec.registry import known_names

    names = known_names(kind)
    if name not in names:
        raise ValueError(f"unknown {kind} '{name}'; allowed: {', '.join(names)}")
    return name


class DataConfig(_Section):
    name: str = "digits"
    data_dir: str | None = None
    train_size: int | None = Field(None, gt=0, description="random subset of the training split")
    test_size: int | None = Field(None, gt=0, description="random subset of the test split")
    partition: Literal["iid", "dirichlet"] = "iid"
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (smaller = more non-IID)")
    min_client_size: int = Field(8, ge=1, description="Dirichlet resampling until every client has this many")
    download: bool = Field(True, description="download missing files when a network exists")

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        return _registered("dataset", v)


class ModelConfig(_Section):
    name: str = "digits_cnn"
    width: int | None = Field(None, description="base channel count of a model that has one (resnet18: 64 is the "
                                                "standard net); an even number >= 2; default: the model's standard")

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str) -> str:
        return _registered("model", v)

    @model_validator(mode="after")
    def _width_fits(self) -> ModelConfig:
        from flsec.registry import BUILT_IN, BUILT_IN_WITH_WIDTH

        if self.width is None:
            return self
        if self.name in BUILT_IN["model"] and self.name not in BUILT_IN_WITH_WIDTH:
            # A plug-in model without a width parameter is refused where models are built.
            raise ValueError(f"model.width: model '{self.name}' has no width option; models with one: "
                             f"{', '.join(BUILT_IN_WITH_WIDTH)}")
        if self.width < 2 or self.width % 2 or self.width > 1024:
            raise ValueError(f"model.width: {self.width} is not allowed; allowed: an even number in 2..1024")
        return self


class TrainingConfig(_Section):
    num_clients: int = Field(10, ge=1)
    rounds: int = Field(10, ge=1)
    client_fraction: float = Field(1.0, gt=0, le=1)
    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    server_lr: float = Field(1.0, gt=0)
    exclude_clients: list[int] = Field(default_factory=list, description="clients that never take part (e.g. a "
                                       "retraining baseline without the suspects); rounds select among the others")
    lr_decay: float = Field(1.0, gt=0, le=1, description="per-round factor of the local learning rate: round r "
                            "trains with lr * lr_decay^(r - 1) (1: constant)")
    augment_crop: int = Field(0, ge=0, le=16, description="local training: random crop after zero padding by this "
                              "many pixels (4 is the usual CIFAR setting; 0: off)")
    augment_flip: bool = Field(False, description="local training: random horizontal flip of each image")


class TriggerConfig(_Section):
    pattern: Literal["checkerboard", "square", "cross"] = "checkerboard"
    size: int = Field(3, ge=1)
    position: Literal["bottom_right", "bottom_left", "top_right", "top_left"] = "bottom_right"
    offset: int = Field(1, ge=0, description="pixels between the patch and the image border")
    value: float = Field(1.0, ge=0, le=1, description="intensity of the 'on' pixels, in [0,1]")
    dba_parts: int = Field(1, ge=1, description="split the trigger into parts, one per attacker (DBA)")


class ConstrainScaleConfig(_Section):
    """Constrain-and-scale model replacement (Bagdasaryan et al. 2020, Sec. 4)."""

    alpha: float = Field(0.9, ge=0, le=1,
                         description="weight of the task loss; 1 - alpha weighs the distance to the global model")
    norm_bound: float | None = Field(None, gt=0, description="bounded scaling: gamma = min(gamma, S / ||X - G||)")


class PGDConfig(_Section):
    """Norm-bounded attacker: projected local SGD (Sun et al. 2019; Wang et al. 2020)."""

    eps: float | None = Field(None, gt=0, description="radius of the ball around the global model (default: the norm of "
                                                      "the attacker's own honest update in the round)")
    eps_factor: float = Field(1.0, gt=0, description="without eps: the radius is this times the honest update's norm")
    norm: Literal["l2", "linf"] = Field("l2", description="the ball's norm")
    project_every: int = Field(1, ge=1, description="project after every k-th local step (and always after the last)")


class NeurotoxinConfig(_Section):
    """Neurotoxin (Zhang et al. 2022): only the coordinates benign clients change least are attacked."""

    top_fraction: float = Field(0.05, gt=0, lt=1,
                                description="share of coordinates excluded: the largest of the benign estimate")
    estimate: Literal["previous_update", "own_gradient"] = Field(
        "previous_update",
        description="benign estimate: the last global update, or the gradient of the attacker's clean data")
    eps: float | None = Field(None, gt=0, description="optional L2 bound (PGD) on the masked update")


class EdgeCaseConfig(_Section):
    """Edge-case backdoor (Wang et al. 2020): a rare-style tail of source_label images relabelled to target_label."""

    tail_fraction: float = Field(0.1, gt=0, lt=1,
                                 description="share of the source class's training images that form the tail")
    neighbours: int = Field(5, ge=1, description="k of the k-nearest-neighbour distance that ranks rarity")
    components: int = Field(20, ge=1, description="PCA components of the space the distance is measured in")


class AttackConfig(_Section):
    kind: str = Field("none", description="a registered attack (flsec.attacks.ATTACKS)")
    num_malicious: int = Field(0, ge=0)
    malicious_ids: list[int] | None = Field(None, description="explicit attacker ids (default: 0..n-1)")
    rounds: list[int] | None = Field(None, description="1-based rounds in which attackers attack (default: all)")
    target_label: int = Field(0, ge=0)
    source_label: int = Field(7, ge=0, description="label flipping: the class relabelled to target_label")
    poison_fraction: float = Field(0.5, gt=0, le=1)
    boost: bool = Field(False, description="model replacement: scale the malicious update by boost_factor")
    boost_factor: float | None = Field(None, gt=0, description="default n_selected / (server_lr * attackers in the round)")
    local_epochs: int | None = Field(None, ge=1, description="attackers' local epochs (default: training.local_epochs)")
    lr: float | None = Field(None, gt=0, description="attackers' local learning rate (default: training.lr)")
    trigger: TriggerConfig = TriggerConfig()
    constrain_scale: ConstrainScaleConfig = ConstrainScaleConfig()
    pgd: PGDConfig = PGDConfig()
    neurotoxin: NeurotoxinConfig = NeurotoxinConfig()
    edge_case: EdgeCaseConfig = EdgeCaseConfig()
    options: dict[str, Any] = Field(default_factory=dict, description="parameters of a plug-in attack (its Options model)")

    @field_validator("kind")
    @classmethod
    def _known_attack(cls, v: str) -> str:
        return _registered("attack", v)

    @model_validator(mode="after")
    def _consistent(self) -> AttackConfig:
        if self.malicious_ids is not None:
            if len(set(self.malicious_ids)) != len(self.malicious_ids):
                raise ValueError("attack.malicious_ids: ids must be distinct")
            if len(self.malicious_ids) != self.num_malicious:
                raise ValueError(
                    f"attack.malicious_ids: {len(self.malicious_ids)} ids given but "
                    f"num_malicious = {self.num_malicious}"
                )
        if self.kind != "none" and self.num_malicious == 0:
            raise ValueError(f"attack.num_malicious: must be >= 1 when attack.kind = '{self.kind}'")
        return self


class AggregationConfig(_Section):
    name: str = "fedavg"
    f: int | None = Field(None, ge=0, strict=True, description="assumed number of attackers (default: attack.num_malicious)")
    multi_krum_m: int | None = Field(None, ge=1, strict=True,
                                     description="Multi-Krum: models averaged, 1..k (default k - f)")
    trim_beta: int | None = Field(None, ge=0, strict=True, description="Trimmed mean: values cut per side (default f)")
    sample_weighted: bool = Field(True, description="FedAvg: weight updates by sample count (false: plain mean)")
    foolsgold_kappa: float = Field(1.0, gt=0, allow_inf_nan=False, description="FoolsGold logit confidence")
    fl_defender_components: int = Field(2, ge=1, strict=True, description="FL-Defender: PCA components")
    similarity_features: Literal["output_weights", "output_layer", "all"] = Field(
        "output_weights", description="FoolsGold / FL-Defender: the part of each update they compare")
    clip_norm: float = Field(1.0, gt=0, allow_inf_nan=False, description="norm_clip: bound M on each update's L2 norm")
    clip_noise: float = Field(0.0, ge=0, allow_inf_nan=False,
                              description="norm_clip: std of Gaussian noise on the mean (weak DP)")
    flame_noise: float = Field(0.001, ge=0, allow_inf_nan=False,
                               description="FLAME: noise level lambda (sigma = lambda * median norm)")
    flame_distance: Literal["models", "updates"] = Field(
        "models", description="FLAME: cluster cosine distances of local models (paper) or of updates")
    root_size: int = Field(100, ge=1, strict=True,
                           description="FLTrust: server root samples taken out of the training split")
    fltrust_server_steps: int | None = Field(
        None, ge=1, strict=True, description="FLTrust: local steps of the server's root update (default: clients' mean)")

    @field_validator("name")
    @classmethod
    def _known_aggregator(cls, v: str) -> str:
        return _registered("aggregator", v)


DEFAULT_CAPTURE_MODE: Literal["realistic", "cooperative"] = "cooperative"


class DetectionConfig(_Section):
    """Which clients the server suspects each round, from what it received (flsec.detection)."""

    detector: str = Field("auto", description="auto (the aggregation rule's own exclusions where it makes them, else "
                                              "norm_cosine), rule, norm, cosine, norm_cosine or a plug-in")
    threshold: float = Field(3.5, gt=0, description="modified z-score above which an update is an outlier "
                                                    "(Iglewicz & Hoaglin's 3.5)")

    @field_validator("detector")
    @classmethod
    def _known_detector(cls, v: str) -> str:
        if v == "auto":
            return v
        try:
            return _registered("suspect detector", v)
        except ValueError as exc:
            raise ValueError(str(exc).replace("allowed: ", "allowed: auto, ")) from None


class CaptureConfig(_Section):
    rounds: Literal["last", "all"] | list[int] = Field("last", description="1-based rounds to capture")
    clients: Literal["suspects", "malicious", "all"] | list[int] = Field(
        "suspects", description="whose updates to keep: suspects (the server's own choice, [detection]; the default "
                                "in realistic mode), all, a list of ids, or malicious (cooperative mode only: it "
                                "uses the ground truth of who attacked; the default there)")
    mode: Literal["realistic", "cooperative"] = Field(
        DEFAULT_CAPTURE_MODE,
        description="realistic: keep only what FedAvg clients send (their updates); cooperative: clients also "
                    "send FedSGD gradients of extra batches (gradient_batch_sizes), which no real protocol does",
    )
    updates: bool = Field(True, description="store the client's full local update (FedAvg)")
    gradient_batch_sizes: list[int] = Field(
        default_factory=lambda: [1],
        description="cooperative mode: also store the gradient of one local batch of each size (FedSGD); "
                    "[] for none; must be [] in realistic mode",
    )

    @model_validator(mode="before")
    @classmethod
    def _mode_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        sizes = data.get("gradient_batch_sizes")
        mode = data.get("mode")
        if mode is None:  # explicit extra gradients imply the cooperative mode
            mode = "cooperative" if sizes not in (None, []) else DEFAULT_CAPTURE_MODE
            data = {**data, "mode": mode}
        if mode == "realistic":
            if data.get("clients") == "malicious":
                raise ValueError("capture.clients: 'malicious' chooses by the ground truth of who attacked, which a "
                                 "server never knows; in capture.mode = 'realistic' use 'suspects' (the server's "
                                 "choice, the default), 'all' or a list of client ids")
            if sizes not in (None, []):
                raise ValueError("capture.gradient_batch_sizes: must be [] when capture.mode = 'realistic' (a real "
                                 "FedAvg client sends only its update); use capture.mode = 'cooperative'")
            return {**data, "gradient_batch_sizes": []}
        if mode == "cooperative" and "clients" not in data:
            data = {**data, "clients": "malicious"}  # the seed's setting
        return data

    @field_validator("gradient_batch_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(b < 1 or b > 64 for b in v):
            raise ValueError("capture.gradient_batch_sizes: each size must be in 1..64")
        return sorted(set(v))


class InversionConfig(_Section):
    """Phase 2 settings used by ``flsec run`` (``flsec invert`` takes the same as options)."""

    method: str = "geiping"
    target: str | None = Field(None, description="gradient_b<B> or update (default: smallest captured batch, "
                                                 "else the update)")
    iterations: int = Field(2000, ge=1)
    restarts: int = Field(1, ge=1)
    lr: float = Field(0.1, gt=0)
    tv_weight: float = Field(1e-4, ge=0)
    max_images: int = Field(16, ge=1, le=4096, description="most images reconstructed at once from one FedAvg "
                                                          "update; an update over more is inverted into this many "
                                                          "by a surrogate replay")
    surrogate_steps: int = Field(0, ge=0, description="steps of a surrogate replay (0: as many as the client took)")
    label_strategy: Literal["llg", "bias-corrected"] = Field(
        "llg", description="label counts from the output bias: llg (needs the update's scale) or bias-corrected "
                           "(breaching's scale-free greedy)")
    boost_correction: Literal["norm", "none"] = Field(
        "norm", description="undo boosting before reading label counts: norm = divide by the update's norm over "
                            "the round's median norm when that exceeds 3")
    space: Literal["pixel", "normalised"] = Field("pixel", description="optimise pixels, or the model's "
                                                                       "standardised input as the authors' code does")
    init: Literal["uniform", "normal"] = Field("uniform", description="random start: uniform pixels or N(0, 1) in "
                                                                     "the optimised space")
    batch_captures: int = Field(1, ge=1, le=4096, description="gradient captures inverted at once in one vectorised "
                                "optimisation (1: one by one, the reference; see benchmarks/results/inversion_batched.md)")
    max_captures: int | None = Field(None, ge=1, description="invert only this many captures, the most suspicious "
                                     "first (the detector's score recorded with each capture); default: every one")

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        return _registered("inversion method", v)


class SyntheticCarriersConfig(_Section):
    """``unlearning.carriers = "synthetic"``: images synthesised from the global model alone (model
    inversion with image priors, Yin et al. 2020 "Dreaming to Distill"), labelled by the model."""

    per_class: int = Field(30, ge=1, le=1000, description="images synthesised for each class")
    steps: int = Field(300, ge=1, description="optimisation steps")
    lr: float = Field(0.05, gt=0, description="Adam step size on the images' logits")
    tv_weight: float = Field(0.1, ge=0, description="weight of the total-variation prior (per-pixel mean)")
    l2_weight: float = Field(0.1, ge=0, description="weight of the L2 (image energy) prior (per-pixel mean)")
    jitter: int | None = Field(None, ge=0, description="random translation in pixels at each step (DeepInversion's "
                                                       "jitter); default one pixel per 14 of the image side")
    bn_weight: float = Field(0.01, ge=0, description="weight of batch-norm feature-statistics matching (models with "
                                                     "BatchNorm running statistics only)")


class UnlearningConfig(_Section):
    """Phase 3: verification, trigger estimation and unlearning on carriers (and the baselines run on the same budget)."""

    steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.01, gt=0)
    retention_weight: float = Field(3.0, ge=0, description="weight lambda of the distillation term (the pre-unlearning "
                                                           "model's outputs on the untriggered carriers) against the "
                                                           "unlearning term; the loss is divided by 1 + lambda")
    augment_shift: int = Field(2, ge=0, description="random translation in pixels")
    augment_noise: float = Field(0.05, ge=0, description="std of added Gaussian pixel noise")
    carriers: Literal["reconstructions", "root", "synthetic"] | None = Field(
        None, description="images the trigger is stamped on while unlearning: the reconstructions, a server-held clean "
                          "root set of root_size images, or images synthesised from the global model (no data at "
                          "all); default: reconstructions with the cooperative capture, synthetic with the realistic")
    root_size: int = Field(100, ge=1, description="carriers = root: clean training images the server holds (the same "
                                                  "seeded draw as FLTrust's root set)")
    root_labels: Literal["true", "model"] = Field(
        "true", description="carriers = root: targets of both terms; true = the root set's own labels (cross-entropy: "
                            "Neural Cleanse's unlearning step with correctly labelled clean images; repairs a model "
                            "the attack damaged, costs a well-trained MNIST model up to 2 points), model = the "
                            "pre-unlearning model's outputs (distillation, as for the other carriers)")
    synthetic: SyntheticCarriersConfig = SyntheticCarriersConfig()
    baselines: bool = Field(True, description="also run the baselines: Neural Cleanse on the model alone, fine-tuning on "
                                              "clean images, retraining without the suspects and without the attackers")
    retrain_baseline: bool = Field(True, description="with baselines: include the two retraining baselines (each as long "
                                                     "as phase 1 again)")
    trigger_source: Literal["auto", "verification", "reverse"] = Field(
        "auto", description="how the trigger is estimated: from what the reconstructions show (verification), by "
                            "Neural Cleanse on the carriers for the target the reconstructions point at (reverse), or "
                            "auto = verification, then reverse when the reconstructions show no trigger")
    reverse_steps: int = Field(300, ge=1, description="Neural Cleanse: optimisation steps per reversed class")
    reverse_references: int = Field(3, ge=1, description="guided Neural Cleanse: classes reversed for reference "
                                                        "beside the candidate targets")
    reverse_ratio: float = Field(0.6, gt=0, le=1, description="guided Neural Cleanse: a candidate target is accepted "
                                 "when its trigger mask is at most this fraction of the smallest reference mask "
                                 "(8x8 digits: backdoor 0.55, clean classes >= 0.9; MNIST: backdoor <= 0.1)")


class FlowerConfig(_Section):
    """``runtime.engine = "flower"``: Flower's simulation engine (Ray) runs the clients."""

    num_supernodes: int | None = Field(
        None, ge=1, description="virtual SuperNodes (default: training.num_clients); client c runs on node c mod this")
    client_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves per running ClientApp (backend client_resources)")
    client_gpus: float = Field(0.0, ge=0, description="GPUs (or a fraction) Ray reserves per running ClientApp")
    ray_address: str | None = Field(None, description="join a running Ray cluster (ray.init address); default: start one")
    ray_num_cpus: int | None = Field(None, ge=1, description="CPUs a Ray started here may use (default: all)")
    round_timeout: float = Field(3600.0, gt=0, description="seconds to wait for a round's replies before failing")


class RuntimeConfig(_Section):
    """How a run is executed; changing it never changes what is computed beyond float rounding."""

    client_engine: Literal["sequential", "vectorised", "auto"] = Field(
        "sequential", description="how a round's clients are run: one after another (the reference), vectorised "
        "with torch.func over client_chunk clients at once, or auto (picked by device and batch size)")
    client_chunk: int = Field(32, ge=1, le=4096, description="vectorised engine: clients trained at once (bounds memory)")
    device: str = Field("auto", description="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    threads: int | None = Field(None, ge=1, le=1024, description="torch CPU threads (default: torch's choice)")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="autocast precision; fp16 needs a GPU")
    memory_format: Literal["contiguous", "channels_last"] = Field(
        "contiguous", description="layout of convolution weights and activations (channels_last: faster oneDNN "
        "kernels on CPU)")
    engine: Literal["inprocess", "flower"] = Field(
        "inprocess", description="inprocess: this process drives the rounds; flower: a Flower ServerApp + ClientApp")
    flower: FlowerConfig = FlowerConfig()

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        import re

        if v not in ("auto", "cpu", "cuda", "mps") and not re.fullmatch(r"cuda:\d+", v):
            raise ValueError(f"unknown device '{v}'; allowed: auto, cpu, cuda, cuda:N, mps")
        return v


class ExperimentConfig(_Section):
    name: str = "experiment"
    seed: int = Field(0, ge=0, le=2**63 - 1, description="run seed; every random stream derives from it")
    plugins: list[str] = Field(default_factory=list, description="modules to import that register plug-ins")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    attack: AttackConfig = AttackConfig()
    aggregation: AggregationConfig = AggregationConfig()
    detection: DetectionConfig = DetectionConfig()
    capture: CaptureConfig = CaptureConfig()
    inversion: InversionConfig = InversionConfig()
    unlearning: UnlearningConfig = UnlearningConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> ExperimentConfig:
        n = self.training.num_clients
        if self.attack.num_malicious > n:
            raise ValueError(f"attack.num_malicious: {self.attack.num_malicious} exceeds training.num_clients = {n}")
        for cid in self.attack.malicious_ids or []:
            if not 0 <= cid < n:
                raise ValueError(f"attack.malicious_ids: {cid} is not in 0..{n - 1}")
        excluded = self.training.exclude_clients
        if any(not 0 <= c < n for c in excluded) or len(set(excluded)) != len(excluded):
            raise ValueError(f"training.exclude_clients: ids must be distinct and in 0..{n - 1}, got {excluded}")
        if len(excluded) >= n:
            raise ValueError(f"training.exclude_clients: excludes all {n} clients; at least one must take part")
        for r in self.attack.rounds or []:
            if not 1 <= r <= self.training.rounds:
                raise ValueError(f"attack.rounds: {r} is not in 1..{self.training.rounds}")
        if isinstance(self.capture.rounds, list):
            for r in self.capture.rounds:
                if not 1 <= r <= self.training.rounds:
                    raise ValueError(f"capture.rounds: {r} is not in 1..{self.training.rounds}")
        if isinstance(self.capture.clients, list):
            for c in self.capture.clients:
                if not 0 <= c < n:
                    raise ValueError(f"capture.clients: {c} is not in 0..{n - 1}")
        if self.attack.trigger.dba_parts > 1 and self.attack.trigger.dba_parts > max(self.attack.num_malicious, 1):
            raise ValueError("attack.trigger.dba_parts: cannot exceed attack.num_malicious")
        return self

    # Derived values -------------------------------------------------------------------------
    @property
    def malicious_ids(self) -> list[int]:
        if self.attack.kind == "none":
            return []
        if self.attack.malicious_ids is not None:
            return sorted(self.attack.malicious_ids)
        return list(range(self.attack.num_malicious))

    @property
    def carriers(self) -> str:
        """The unlearning carriers in effect (``unlearning.carriers`` or the capture mode's default)."""
        if self.unlearning.carriers is not None:
            return self.unlearning.carriers
        return "synthetic" if self.capture.mode == "realistic" else "reconstructions"

    @property
    def clients_per_round(self) -> int:
        t = self.training
        return min(max(1, round(t.client_fraction * t.num_clients)), t.num_clients - len(t.exclude_clients))

    @property
    def assumed_attackers(self) -> int:
        if self.aggregation.f is not None:
            return self.aggregation.f
        return self.attack.num_malicious if self.attack.kind != "none" else 0


class SweepGrid(_Section):
    """A sweep's grid file: ``[grid]`` maps quoted dotted config paths to the lists of values to try
    (their Cartesian product is the sweep); ``[labels]`` optionally names the values of an axis, e.g.
    when they are tables (``"attack" = [{kind = "pgd"}, {kind = "neurotoxin"}]``)."""

    grid: dict[str, list[Any]] = Field(..., description="dotted config path -> values")
    labels: dict[str, list[str]] = Field(default_factory=dict, description="dotted config path -> value names")

    @model_validator(mode="after")
    def _well_formed(self) -> SweepGrid:
        import json

        if not self.grid:
            raise ValueError("grid: the [grid] table is empty; add e.g. \"aggregation.name\" = [\"fedavg\", \"krum\"]")
        for key, values in self.grid.items():
            if not key or any(not part for part in key.split(".")):
                raise ValueError(f"grid: '{key}' is not a dotted config path such as \"training.rounds\"")
            if key == "seed":
                raise ValueError("grid: 'seed' cannot be an axis; use --seeds")
            if not values:
                raise ValueError(f"grid.{key}: needs at least one value")
            shown = [json.dumps(v, sort_keys=True) for v in values]
            if len(set(shown)) != len(shown):
                raise ValueError(f"grid.{key}: values must be distinct")
        for key, names in self.labels.items():
            if key not in self.grid:
                raise ValueError(f"labels.{key}: not an axis of [grid]; axes: {', '.join(self.grid)}")
            if len(names) != len(self.grid[key]):
                raise ValueError(f"labels.{key}: {len(names)} labels for {len(self.grid[key])} values")
            if len(set(names)) != len(names):
                raise ValueError(f"labels.{key}: labels must be distinct")
        return self


def load_grid(path: Path) -> SweepGrid:
    """Read and validate a sweep grid file (``flsec sweep --grid``)."""
    if not path.is_file():
        raise ConfigError(f"--grid: file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--grid: {path} is not valid TOML: {exc}") from None
    try:
        return SweepGrid.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = str(err["msg"]).removeprefix("Value error, ")
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"--grid: {path}: unknown table '{loc}'; allowed: grid, labels") from None
        detail = msg if msg.startswith(("grid", "labels")) else f"{loc}: {msg}"
        raise ConfigError(f"--grid: {path}: {detail}") from None


# Loading --------------------------------------------------------------------------------------


def _parse_value(raw: str) -> Any:
    """Parse an override value as TOML (numbers, booleans, lists, strings); fall back to a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to a nested dict (a new dict is returned)."""
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set '{item}': expected key=value, e.g. training.rounds=5")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set '{item}': empty key")
        node = out
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set '{item}': '{p}' is a value, not a section")
            node = child
        node[parts[-1]] = _parse_value(raw.strip())
    return out


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = ExperimentConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            break
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            break
    return list(model.model_fields)


def format_validation_error(exc: ValidationError) -> str:
    """One line for the first error: the dotted field, what is wrong, what is allowed."""
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    dotted = ".".join(str(p) for p in loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _fields_at(loc[:-1])
        return f"{dotted}: unknown key; allowed keys: {', '.join(allowed)}"
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
        head = msg.split(":", 1)[0]
        if not dotted or ("." in head and " " not in head):
            return msg
        return f"{dotted}: {msg}"
    value = err.get("input")
    shown = repr(value) if not isinstance(value, dict) else "a section"
    return f"{dotted}: {msg} (got {shown})" if dotted else msg


def build_config(data: dict[str, Any], import_plugins: bool = True) -> ExperimentConfig:
    """Validate an experiment. ``import_plugins`` imports the modules its ``plugins`` field names:
    right for a config file the user wrote, never for one read out of a run directory."""
    from flsec import registry

    plugins = data.get("plugins", [])
    if import_plugins and isinstance(plugins, list):
        registry.import_plugins([str(p) for p in plugins])
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def read_toml(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: file not found: {path}")
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--config: {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {path} is not valid TOML: {exc}") from None


def load_config(path: Path | str | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a TOML experiment file (or the defaults) and apply ``--set`` overrides."""
    data = read_toml(path) if path is not None else {}
    return build_config(apply_overrides(data, overrides or []))
