"""The amalgamation configuration: every hyper-parameter, validated, with named loss weights.

Unknown keys, wrong types and impossible values are rejected before any training starts. The ``dfka``
preset (default) adds the terms that calibration showed to matter; ``paper`` turns them off so the
ablation is one flag away.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class GanLoss(_Strict):
    """Weights of the stage-1 loss L = L_oh + α·L_a + β·L_ie + γ·L_dis + bn + consistency + adv + tv
    (+ div + route in the origin-labelled mode).

    Every field is a loss weight, and :meth:`weighted` sums the terms in the order the fields are
    declared here: a new term is a new field, in the place it should be added.
    """

    oh: float = Field(1.0, ge=0)
    a: float = Field(0.1, ge=0, description="α, activation loss")
    ie: float = Field(5.0, ge=0, description="β, information-entropy (balance) loss")
    dis: float = Field(1.0, ge=0, description="γ, discreteness: few labels / few owning teachers")
    bn: float = Field(1.0, ge=0, description="BatchNorm-statistics matching (not in the paper)")
    consistency: float = Field(1.0, ge=0, description="Eq. 11: intermediate levels agree with the image")
    adv: float = Field(0.0, ge=0, description="adversarial student-teacher discrepancy (not in the paper)")
    tv: float = Field(0.0, ge=0, description="total-variation image prior (DeepInversion; not in the paper)")
    div: float = Field(
        1.0,
        ge=0,
        description="origin-labelled mode: diversity hinge between samples of one slot (not in the paper)",
    )
    route: float = Field(
        1.0,
        ge=0,
        description="origin-labelled mode: the teachers' union routes a sample to its origin teacher (not in the paper)",
    )

    @classmethod
    def terms(cls) -> tuple[str, ...]:
        """The loss terms, in summation order: every field (each is a weight), as declared."""
        return tuple(cls.model_fields)

    def weighted(self, parts: dict[str, Any]) -> Any:
        """Σ weight · part over the terms present in ``parts``, summed in :meth:`terms` order (a method
        without consistency or adversarial terms, like the DAFL baseline, simply leaves them out)."""
        terms = [getattr(self, name) * parts[name] for name in self.terms() if name in parts]
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        return total


class Budget(_Strict):
    """How long a stage trains: a fixed number of steps (reproducible), or seconds (fixed after warm-up)."""

    steps: int | None = Field(None, ge=1)
    seconds: float | None = Field(None, gt=0)

    @classmethod
    def share(cls, seconds: float) -> Budget:
        """A stage's share of a wall-clock budget; a share of 0 s is one step (the stage still runs
        and reports, and takes no time out of the others')."""
        return cls(seconds=seconds) if seconds > 0 else cls(steps=1)

    @model_validator(mode="after")
    def _one(self) -> Budget:
        if self.steps is not None and self.seconds is not None:
            raise ValueError("give steps or seconds, not both")
        return self


class GanConfig(_Strict):
    latent_dim: int = Field(100, ge=1)
    widths: int | list[int] | None = Field(
        None,
        description="hidden width of every group (int) or per group (list of B); default 32, 16 for the image",
    )
    batch_size: int = Field(64, ge=2)
    lr: float = Field(5e-3, gt=0, description="Adam, betas (0.5, 0.999), cosine decay")
    budget: Budget = Budget(steps=2000)
    loss: GanLoss = GanLoss()
    bn_routing: Literal["batch", "owner"] = Field(
        "owner",
        description="BN-statistics matching per teacher over the samples it owns (default), or over the "
        "whole batch (DeepInversion's, single-teacher form)",
    )
    adv_student_steps: int = Field(
        1, ge=1, description="proxy-student KD steps per generator step when adv > 0"
    )
    conditional: Literal["auto", "on", "off"] = Field(
        "auto",
        description="conditional synthesis (dfka.amalgamation.origin): with multi-class teachers each sample "
        "is generated for one teacher's label (origin-labelled), with multi-label teachers for a target "
        "label vector (label-conditioned); auto = origin-labelled when every teacher is multi-class, "
        "on = also label-conditioned when every teacher is multi-label",
    )
    positives: tuple[int, int] = Field(
        (1, 3),
        description="label-conditioned mode: each target has k ~ U{lo..hi} positive labels, uniform over "
        "Y_cst (clamped to |Y_cst|); the default 1-3 is a generic few-labels-per-image prior",
    )
    augment_shift: int = Field(
        2,
        ge=0,
        le=8,
        description="origin-labelled mode: random shift (pixels) before every teacher and student",
    )
    diversity_margin: float = Field(0.1, ge=0, le=1, description="δ of the diversity hinge (mean |Δpixel|)")

    @model_validator(mode="after")
    def _positives(self) -> GanConfig:
        lo, hi = self.positives
        if lo < 0 or hi < lo:
            raise ValueError(f"gan.positives must be 0 <= lo <= hi, got {list(self.positives)}")
        return self


class ExportConfig(_Strict):
    """The synthetic sample set stage 2 trains on."""

    samples: int = Field(40000, ge=1)
    source: Literal["trajectory", "final"] = Field(
        "trajectory",
        description="trajectory: a reservoir of the samples stage 1 generated after `start` of its schedule; "
        "final: fresh samples from the final generator",
    )
    start: float = Field(
        0.3, ge=0, lt=1, description="fraction of stage 1 after which trajectory samples are kept"
    )
    shard_size: int = Field(10000, ge=1)
    dtype: Literal["float16", "float32"] = "float16"
    max_seconds: float | None = Field(
        None,
        gt=0,
        description="wall-clock cap on topping the bank up from the final generator (the bank then holds "
        "what was made in time, at least one batch); default under budget_minutes: "
        "EXPORT_SHARE of the budget, else none",
    )


#: Under ``budget_minutes``, the share of the budget the export's top-up may take at most. With slow
#: teachers (ResNet-18s on 32x32 RGB: 167 samples/s) a 40,000-sample top-up took 224 s of a 3-minute
#: budget and left stages 2 and 3 eight seconds; on LeNet teachers the trajectory fills the bank and
#: the top-up takes no time, so the cap does not bind.
EXPORT_SHARE = 0.1


class BlocksConfig(_Strict):
    """Stage 2: block-wise training of the dual generator (the future TargetNet)."""

    batch_size: int = Field(64, ge=2)
    lr: float = Field(2e-3, gt=0)
    budget: Budget = Budget(steps=3000)
    block_weights: list[float] | None = Field(
        None, description="share of the budget per block; default equal"
    )
    lambda_teachers: dict[str, float] = Field(default_factory=dict, description="λ_m, default 1 per teacher")
    lambda_stream1: float = Field(1.0, ge=0, description="λ¹: the student's own path from the image")
    lambda_stream2: float = Field(1.0, ge=0, description="λ²: the generator's feature at the same level")
    temperature: float = Field(1.0, gt=0)


class OriginLoss(_Strict):
    """Fine-tune loss weights on origin-labelled samples (``dfka.amalgamation.origin``)."""

    ce: float = Field(1.0, ge=0, description="hard CE toward the sample's origin label")
    own_kd: float = Field(1.0, ge=0, description="KD from the origin teacher over its own labels")
    which: float = Field(1.0, ge=0, description="CE on which teacher the sample came from")
    union_kd: float = Field(
        2.0,
        ge=0,
        description="KD toward the teachers' (calibrated) union, beside the origin terms: it carries the "
        "teachers' own routing where they are calibrated",
    )
    temperature: float = Field(4.0, gt=0, description="τ of the own-teacher KD")
    union_temperature: float = Field(
        4.0, gt=0, description="τ of the union KD here (regroup.temperature is the plain fine-tune's)"
    )
    calibrate: bool = Field(
        True, description="fit per-teacher offsets of the union on the origin-known samples before its KD"
    )
    routed_only: Literal["off", "origin", "all"] = Field(
        "all",
        description="samples the (calibrated) union does not route to their origin teacher: kept (off), left "
        "out of the origin CE and which-teacher terms (origin), or left out of every term (all)",
    )
    mix: float = Field(
        0.0,
        ge=0,
        le=4,
        description="boundary samples: per fine-tune batch, this many times the batch size of pixel mixes of "
        "two samples of different teachers, distilled from the (calibrated) union of the teachers run on "
        "the mix",
    )
    mix_weight: float = Field(1.0, ge=0, description="weight of the union KD on the mixed samples")


class TargetLoss(_Strict):
    """Fine-tune loss weights on label-conditioned samples (multi-label teachers,
    ``dfka.amalgamation.origin.LabelTargets``)."""

    bce: float = Field(1.0, ge=0, description="BCE of the student toward the sample's target label vector")
    union_kd: float = Field(1.0, ge=0, description="BCE toward the teachers' union (their sigmoids)")
    agree_only: bool = Field(
        False,
        description="confidence filter: learn only from samples whose teachers' union (σ > 0.5) gives "
        "exactly the target",
    )


class RegroupConfig(_Strict):
    """Stage 3: assemble the TargetNet, then fine-tune it end to end on the generated samples.

    The fine-tune is on in the ``dfka`` preset: on digits, block-wise training alone reached 93.2% and
    block-wise + fine-tune 95.0% (plain KD on the same samples for the same steps: 94.3%). The ``paper``
    preset turns it off. ``lr`` 2e-3 at ``batch_size`` 128 (was 5e-4 at 64): on the dev split at equal
    wall-clock, three-teachers +4.1, multilabel +4.7 mAP, cross-domain +1.1, fashion +0.7, digits +1.4 and
    -1.3 (two seeds), custom-subset -0.1 (docs/method.md).
    """

    finetune: Budget | None = Budget(steps=6000)
    lr: float = Field(2e-3, gt=0)
    batch_size: int = Field(128, ge=2)
    temperature: float = Field(1.0, gt=0)
    origin: OriginLoss = OriginLoss()
    targets: TargetLoss = TargetLoss()
    augment_shift: int = Field(2, ge=0, le=8, description="origin-labelled mode: random shift of the images")


class UnionConfig(_Strict):
    rule: Literal["logits", "softmax"] = "logits"
    routing: Literal["none", "bias"] = Field("none", description="data-free routing calibration")


#: ``budget_split`` default: no block-wise stage 2, its time to the end-to-end fine-tune (and Eq. 11,
#: which only feeds stage 2, off). On the dev split at equal wall-clock against 40/30/30: three teachers
#: +4.7, RGB ResNet-18 teachers +3.1, fashion -1.3, cross-domain -2.0 (docs/method.md, "Where the time
#: goes"). The ``paper`` preset, which has no fine-tune, gives stage 2 the fine-tune's share.
DEFAULT_SPLIT = {"gan": 0.4, "blocks": 0.0, "finetune": 0.6}


class AmalgamationConfig(_Strict):
    preset: Literal["dfka", "paper"] = "dfka"
    student: str = Field("lenet5:0.5", description="registry spec, e.g. lenet5:0.5 or resnet:1:blocks=3")
    target_labels: list[str] | None = None
    seed: int = Field(0, ge=0, lt=2**63, description="torch.manual_seed range")
    device: str = "auto"
    threads: int | None = Field(None, ge=1)
    budget_minutes: float | None = Field(
        None,
        gt=0,
        description="total training wall-clock of stage 1, the sample export and stages 2-3, the same in "
        "`dfka amalgamate` and in the pipeline: stage 1 gets its budget_split share, stages 2 and 3 split "
        "what stage 1 and the export left in their budget_split ratio (writing shards, process start-up "
        "and the evaluation are not counted)",
    )
    budget_split: dict[Literal["gan", "blocks", "finetune"], float] = Field(
        default_factory=lambda: dict(DEFAULT_SPLIT),
        description="shares of budget_minutes per stage; a stage with share 0 runs one step",
    )
    gan: GanConfig = GanConfig()
    export: ExportConfig = ExportConfig()
    blocks: BlocksConfig = BlocksConfig()
    regroup: RegroupConfig = RegroupConfig()
    union: UnionConfig = UnionConfig()

    def export_seconds(self) -> float | None:
        """The export's top-up time cap: ``export.max_seconds``, else ``EXPORT_SHARE`` of the budget."""
        if self.export.max_seconds is not None:
            return self.export.max_seconds
        return None if self.budget_minutes is None else EXPORT_SHARE * 60 * self.budget_minutes

    @model_validator(mode="after")
    def _apply(self) -> AmalgamationConfig:
        if any(v < 0 for v in self.budget_split.values()) or sum(self.budget_split.values()) <= 0:
            raise ValueError("budget_split values must be >= 0 and sum to more than 0")
        if self.preset == "paper":
            # the paper's method only: no BN matching, no adversarial term, no fine-tune, no routing fit
            self.gan.loss.bn = 0.0
            self.gan.loss.adv = 0.0
            self.regroup.finetune = None
            self.union.routing = "none"
            self.gan.conditional = "off"
        if self.budget_minutes is not None:
            seconds = {k: 60 * self.budget_minutes * v for k, v in self.stage_shares().items()}
            self.gan.budget = Budget.share(seconds["gan"])
            self.blocks.budget = Budget.share(seconds["blocks"])
            self.regroup.finetune = Budget(seconds=seconds["finetune"]) if seconds["finetune"] else None
        if self.blocks.budget.steps == 1 and "consistency" not in self.gan.loss.model_fields_set:
            # Eq. 11 shapes the generator's intermediate features for stage 2's second stream only;
            # with no block training (a zero share, or a one-step budget) it costs teacher passes and
            # buys nothing
            self.gan.loss.consistency = 0.0
        return self

    def stage_shares(self) -> dict[str, float]:
        """``{gan, blocks, finetune}`` shares of the budget, summing to 1: ``budget_split`` with the
        fine-tune's share moved to stage 2 when there is no fine-tune (``preset: paper``).

        The one home of this rule: the single-process run re-splits what stage 1 and the export left
        (``run.remaining_budget``) with these shares, and each pipeline stage reads its own."""
        split = {k: float(self.budget_split.get(k, 0.0)) for k in ("gan", "blocks", "finetune")}
        if self.regroup.finetune is None:
            split["blocks"], split["finetune"] = split["blocks"] + split["finetune"], 0.0
        total = sum(split.values())
        return {k: v / total for k, v in split.items()}
