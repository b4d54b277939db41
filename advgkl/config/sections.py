"""The config's sections as typed dataclasses: every key, its default, its allowed values and a
line of documentation (`advgkl config` prints them resolved). Each method's own section comes
from its settings class in `advgkl.config.methods`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from advgkl.config.fields import opt
from advgkl.config.methods import METHOD_NAMES, METHODS, Settings

LR_SCHEDULES = ("cosine", "cosine_shifted", "piecewise", "cosinew", "cyclic", "superconverge",
                "piecewise_step", "warmup_cosine", "timm_cosine")
ATTACK_OBJECTIVES = ("auto", "kl", "teacher_kl", "adaad", "gkl", "ce")
RANDOM_STARTS = ("auto", "normal", "uniform", "uniform_unclamped", "none")
ATTACK_KINDS = ("auto", "pgd", "fgsm", "n_fgsm", "apgd", "ares_pgd")
CO_GUARD_MODES = ("auto", "off", "warn", "stop", "rollback")


@dataclass
class DataConfig:
    dataset: str = opt("cifar10", choices=("cifar10", "cifar100", "digits", "imagenet", "folder"),
                       doc="imagenet / folder: an image-folder tree ROOT/train|val/<class>/<image>"
                       " streamed from disk (imagenet: the 1000 wnid folders, RobustBench's "
                       "labels and points)")
    root: str = opt("data", doc="folder holding the torchvision data sets, or ROOT of an "
                    "image-folder tree")
    shards: str = opt("", doc="image-folder data: train from the tar shards `advgkl data shards` "
                      "wrote into this folder instead of ROOT/train; empty: the folder")
    image_size: int = opt(224, ge=8, doc="image-folder data: side of the training crop")
    preprocessing: str = opt("Res256Crop224", doc="image-folder data: the evaluation "
                             "preprocessing (RobustBench's names: Res256Crop224, "
                             "BicubicRes256Crop224, Crop288, Res224; other sizes as Res40Crop32)")
    download: bool = opt(False, doc="let torchvision download a missing data set")
    augment: str = opt("basic", choices=("none", "basic", "autoaugment", "cutout", "imagenet"),
                       doc="imagenet (image-folder data): timm's RandomResizedCrop + flip + "
                       "colour jitter; none: the evaluation preprocessing")
    rand_augment: str = opt("", doc="augment imagenet: timm's RandAugment policy (the recipes': "
                            "rand-m9-mstd0.5-inc1); empty: none")
    color_jitter: float = opt(0.4, ge=0, doc="augment imagenet: timm's colour jitter strength")
    interpolation: str = opt("bilinear", choices=("bilinear", "bicubic", "random"),
                             doc="augment imagenet: RandomResizedCrop's resampling")
    re_prob: float = opt(0.0, ge=0, le=1, doc="augment imagenet: timm's RandomErasing "
                         "probability (pixel mode: N(0, 1) noise on the [0, 1] image)")
    mixup: float = opt(0.0, ge=0, doc="timm's Mixup alpha (soft targets); 0: off")
    cutmix: float = opt(0.0, ge=0, doc="timm's CutMix alpha (soft targets); 0: off")
    mixup_prob: float = opt(1.0, ge=0, le=1, doc="probability of Mixup or CutMix per batch")
    mixup_switch_prob: float = opt(0.5, ge=0, le=1, doc="with both: probability of CutMix")
    smoothing: float = opt(0.0, ge=0, lt=1, doc="label smoothing of Mixup/CutMix's soft targets")
    two_view: bool = opt(False, doc="train on a basic view and an `augment` view of each image")
    aug_weight: float = opt(1.0, ge=0, doc="weight of the augmented view's robust term")
    num_workers: int = opt(4, ge=0)
    device_augment: bool = opt(False, doc="basic augmentation (crop+flip) on uint8 batches on "
                               "the training device instead of in the loader")
    generated: str = opt("", doc="generated images: .npz (image, label) or an `advgkl data "
                         "convert` folder; empty: none")
    generated_fraction: float = opt(0.0, ge=0, le=1, doc="share of generated images per batch")
    epoch_samples: int = opt(0, ge=0, doc="samples per epoch with generated data; 0: train set size")


@dataclass
class ModelConfig:
    arch: str = opt("wrn-34-10", doc="registered architecture name, or timm:<name> for any timm "
                    "model (random weights; see model.init)")
    normalize: bool = opt(True, doc="timm:<name> models: ImageNet's mean and std inside the model")
    init: str = opt("", doc="initial weights: a timm or safetensors file, an advgkl checkpoint, or "
                    "robustbench:<dataset>/<threat>/<name>; loaded strictly before the run "
                    "folder exists; empty: random")
    model_dir: str = opt("models", doc="RobustBench's weights folder for a robustbench: init")


@dataclass
class AttackConfig:
    """The training attack (inner maximization): its budget here, its objective and start by
    default the method's own."""

    norm: str = opt("Linf", choices=("Linf", "L2"))
    eps: float = opt(8 / 255, ge=0, eps=True, doc="0: no attack (the method on clean images only)")
    step_size: float = opt(2 / 255, gt=0, eps=True)
    steps: int = opt(10, ge=0)
    restarts: int = opt(1, ge=1, doc="pgd_at: restarts, the per-point strongest kept (Rice et "
                        "al.'s --restarts)")
    kind: str = opt("auto", choices=ATTACK_KINDS,
                    doc="auto: the method's own (pgd; fgsm_rs, n_fgsm, grad_align: their single "
                    "step). n_fgsm with another method: N-FGSM's published step on the method's "
                    "attack objective (our extension)")
    objective: str = opt("auto", choices=ATTACK_OBJECTIVES,
                         doc="auto: the method's own. kl: KL to the model's clean softmax; "
                         "teacher_kl: to the teacher's (RSLAD); adaad: KL(teacher(x') || "
                         "student(x')) through both (AdaAD); gkl: alpha sCE + beta wMSE with the "
                         "class prior (GKL's CIFAR-100 attack); ce: Madry's")
    alpha: float = opt(1.0, ge=0, doc="objective gkl: weight of the soft-label CE")
    beta: float = opt(1.0, ge=0, doc="objective gkl: weight of the prior-weighted wMSE")
    gamma: float = opt(1.0, ge=0, doc="objective gkl: exponent of the class-prior rows")
    random_start: str = opt("auto", choices=RANDOM_STARTS,
                            doc="auto: the method's own. normal: x + 0.001 N(0,1), first gradient "
                            "unprojected (TRADES, MART, GKL, RSLAD, AdaAD); uniform: in the eps "
                            "ball, projected (Madry); uniform_unclamped: in the ball, not clamped "
                            "to [0, 1] before the first gradient (ARD)")
    schedule: str = opt("constant", choices=("constant", "linear_ramp", "paper_effective",
                                             "paper_intended", "ares_ramp"),
                        doc="ares_ramp: step_size * min(epoch - 1, 5) / 5 (ARES: 0 in epoch 1)")


def _section(method: str) -> Any:
    return field(default_factory=METHODS[method].settings)


@dataclass
class LossConfig:
    """`method` and one section per method; only the chosen method's section is used."""

    method: str = opt("gkl", choices=METHOD_NAMES)
    pgd_at: Any = _section("pgd_at")
    trades: Any = _section("trades")
    mart: Any = _section("mart")
    lbgat: Any = _section("lbgat")
    ikl: Any = _section("ikl")
    gkl: Any = _section("gkl")
    fgsm_rs: Any = _section("fgsm_rs")
    n_fgsm: Any = _section("n_fgsm")
    grad_align: Any = _section("grad_align")
    singh_at: Any = _section("singh_at")
    ares_at: Any = _section("ares_at")
    ard: Any = _section("ard")
    rslad: Any = _section("rslad")
    adaad: Any = _section("adaad")
    gkl_kd: Any = _section("gkl_kd")

    @property
    def settings(self) -> Settings:
        """The chosen method's section."""
        return getattr(self, self.method)


@dataclass
class DistillConfig:
    teacher: str = opt("", doc="the frozen teacher of ard, rslad, adaad and gkl_kd: an advgkl "
                       "checkpoint, or robustbench:<dataset>/<threat>/<name>")
    teacher_weights: str = opt("auto", choices=("auto", "avg", "ema", "model"),
                               doc="which weights of an advgkl checkpoint (auto: as advgkl eval)")
    teacher_sha256: str = opt("", doc="written by advgkl train: the teacher file's sha256; a run "
                              "(or resume) refuses a file with another")
    model_dir: str = opt("models", doc="RobustBench's weights folder for robustbench: teachers")


@dataclass
class AwpConfig:
    gamma: float = opt(0.005, ge=0, doc="weight perturbation size; 0 disables AWP")
    warmup_epochs: int = opt(10, ge=0)


@dataclass
class TrainConfig:
    epochs: int = opt(200, ge=1)
    batch_size: int = opt(128, ge=1, doc="global batch: split evenly over the processes")
    lr: float = opt(0.2, gt=0, doc="the peak lr (times batch_size / lr_base_batch when set)")
    lr_base_batch: int = opt(0, ge=0, doc="ARES' rule: lr scales by batch_size / this; 0: off")
    optimizer: str = opt("sgd", choices=("sgd", "adamw"))
    betas: list[float] = opt([0.9, 0.999], doc="adamw's betas")
    adam_eps: float = opt(1e-8, gt=0, doc="adamw's eps")
    accumulate: int = opt(1, ge=1, doc="micro-batches per optimizer step (each process's share "
                          "of batch_size split in this many)")
    checkpoint_steps: int = opt(0, ge=0, doc="also write last.pt every N optimizer steps inside "
                                "an epoch (exact resume there); 0: at epoch ends only")
    lr_schedule: str = opt("cosine", choices=LR_SCHEDULES, doc="per epoch: cosine, "
                           "cosine_shifted, piecewise; per step: cosinew (DM-AT), cyclic (Wong et "
                           "al.'s CyclicLR), superconverge (GradAlign's / Rice et al.'s triangle "
                           "peaking at 2/5), piecewise_step (Rice et al.), warmup_cosine (Singh et al. "
                           "2023), timm_cosine (timm's CosineLRScheduler on updates, ARES)")
    cycle_momentum: bool = opt(False, doc="lr_schedule cyclic: CyclicLR's default momentum cycle, "
                               "0.9 at lr 0 down to 0.8 at the peak (train.momentum unused)")
    lr_warmup_epochs: int = opt(0, ge=0)
    lr_warmup_start: float = opt(0.0, ge=0, doc="warmup_cosine / timm_cosine: the lr the warm-up "
                                 "starts from")
    lr_min: float = opt(0.0, ge=0, doc="warmup_cosine / timm_cosine: the cosine's floor")
    lr_first_epochs: list[float] = opt([], doc="the lr of each first epoch, replacing the "
                                       "schedule's value there (LBGAT's script: [0.02])")
    lr_milestones: list[int] = opt([100, 150], doc="epochs from which piecewise divides lr by 10")
    momentum: float = opt(0.9, ge=0, lt=1)
    nesterov: bool = opt(False)
    weight_decay: float = opt(5e-4, ge=0)
    no_decay_bn_bias: bool = opt(False, doc="exempt biases and norm weights (all 1-d parameters) "
                                 "from decay")
    no_decay_list: bool = opt(False, doc="also exempt the timm model's no_weight_decay() names "
                              "(position embeddings; timm's create_optimizer, ARES)")
    ema_tau: float = opt(0.9996, ge=0, lt=1)
    ema_start_epoch: int = opt(150, ge=0, doc="EMA copies the weights in this epoch, then averages; "
                                                      "past train.epochs: no EMA")
    ema_warmup: bool = opt(False, doc="decay min(tau, (1+n)/(10+n)) after n updates (DM-AT)")
    ema_from_init: bool = opt(False, doc="timm's ModelEmaV2: the EMA starts as the initial "
                              "weights and averages from the first step (ema_start_epoch unused)")
    select_with_ema: bool = opt(True, doc="evaluate and pick best.pt with the EMA once it runs "
                                "(with the epoch average instead, once that runs)")
    epoch_avg_tau: float = opt(0.0, ge=0, lt=1, doc="the authors' final step: after each epoch "
                               "avg <- (1 - tau) w + tau avg; 0: off")
    epoch_avg_start: int = opt(1, ge=1, doc="the epoch whose weights start the epoch average")
    save_every: int = opt(0, ge=0, doc="keep epoch-NNN.pt (the model's weights) every N epochs; "
                          "0: none")
    co_guard: str = opt("auto", choices=CO_GUARD_MODES,
                        doc="catastrophic-overfitting guard after each epoch (CE and margin "
                        "PGD, FGSM on validation points): off, warn, stop (keep the epoch it "
                        "rated best) or rollback (restore that epoch and go on at half the lr); "
                        "auto: stop for single-step training with eval.check=val, else off")
    co_guard_points: int = opt(512, ge=1, doc="validation points the guard attacks")
    co_guard_steps: int = opt(10, ge=1, doc="the guard's PGD steps (2.5 eps / steps each)")
    co_guard_drop: float = opt(0.2, gt=0, le=1, doc="catastrophic: PGD accuracy falls by more "
                               "than this from the last good epoch (Wong et al.: 0.2)")
    co_guard_fraction: float = opt(0.5, ge=0, lt=1, doc="... or below this fraction of the best "
                                   "good epoch's")
    co_guard_min_drop: float = opt(0.1, ge=0, le=1, doc="... and by more than this below it")
    co_guard_rollbacks: int = opt(3, ge=1, doc="rollbacks before the guard stops instead")
    seed: int = opt(0, ge=0)
    device: str = opt("auto", doc="auto, cpu, cuda or cuda:N")
    precision: str = opt("fp32", choices=("fp32", "bf16"),
                         doc="training forward/backward: bf16 autocast on CUDA (evaluation: fp32)")
    attack_precision: str = opt("fp32", choices=("fp32", "bf16"), doc="the training attack's")
    channels_last: bool = opt(False, doc="channels_last memory format (CUDA)")
    compile: bool = opt(False, doc="torch.compile the training forward (CUDA)")
    cudnn_benchmark: bool = opt(True, doc="let cuDNN pick the fastest kernels (CUDA)")
    sync_bn: bool = opt(False, doc="synchronize BatchNorm statistics across GPUs (DDP)")


@dataclass
class EvalConfig:
    norm: str = opt("Linf", choices=("Linf", "L2"))
    eps: float = opt(8 / 255, ge=0, eps=True)
    version: str = opt("standard", choices=("standard", "plus", "rand", "custom"))
    n_examples: int = opt(10000, ge=1)
    batch_size: int = opt(500, ge=1)
    pgd_steps: int = opt(10, ge=1, doc="steps of the per-epoch PGD check")
    check: str = opt("val", choices=("val", "test", "none"),
                     doc="the per-epoch check and best.pt: val, a split of the training set "
                     "(excluded from training); test, the first holdout_size TEST points "
                     "(selection on test data, marked in every record); none: no check, no best.pt")
    val_size: int = opt(1024, ge=1, doc="training images held out for check=val (fixed by "
                        "train.seed)")
    holdout_size: int = opt(1000, ge=1, doc="test points of the per-epoch check with check=test")


LOGGERS = ("tensorboard", "wandb")


@dataclass
class RunConfig:
    name: str = opt("", doc="run folder name (a plain name); empty: the config file's name")
    out_dir: str = opt("checkpoints")
    loggers: list[str] = opt([], doc="experiment trackers besides metrics.csv: tensorboard "
                             "(RUN/tensorboard/), wandb (honours WANDB_MODE=offline)")
    log_every: int = opt(0, ge=0, doc="also send the training loss to the trackers every N "
                         "steps; 0: per epoch only")
    wandb_project: str = opt("advgkl", doc="the W&B project of run.loggers=[wandb]")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    awp: AwpConfig = field(default_factory=AwpConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
