"""The training configuration: one typed tree, YAML recipes with ``inherits``, ``key=value`` overrides.

Resolution order (later wins): the defaults below (TimeSformer 8x224 on Kinetics-400, the paper's
recipe) < parent recipes < the recipe < command-line overrides. Every layer is checked on its own, so
an unknown key or a wrong type is reported with the file (or "command line") and the dotted field
that holds it. Derived values (gradient accumulation, steps) are computed from the resolved tree and
the world size, never written by hand.

    cfg = load_recipe("k400_long", ["train.micro_batch=2", "cluster.partition=gpu"])
    plan = batch_plan(cfg, world_size=32)      # raises if the global batch cannot be met
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from pipeline.models.registry import FAMILIES, MODELS, family_of


def _recipes_dir() -> Path:
    """Where the named recipes are: ``configs/recipes`` of the checkout this package runs from, else the copy an
    installed package ships (pyproject's data-files: ``<prefix>/share/timesformer-pipeline/recipes``, under the
    environment's prefix or the user base of ``pip install --user``)."""
    import site
    import sys

    checkout = Path(__file__).resolve().parent.parent / "configs" / "recipes"
    if checkout.is_dir():
        return checkout
    for base in (sys.prefix, getattr(site, "USER_BASE", None) or ""):
        shipped = Path(base) / "share" / "timesformer-pipeline" / "recipes"
        if base and shipped.is_dir():
            return shipped
    return checkout  # neither: recipe_path's message names this path and lists no recipe


RECIPES_DIR = _recipes_dir()


class ConfigError(ValueError):
    """A recipe, an override or a combination of values that cannot run; the message says where."""


# The model section: which registered model (pipeline.models.registry), where its weights start, and every field
# of the models' own configs (TimeSformerConfig, ResNet3DConfig, ...: the union over the registered families, a
# field shared by two families meaning the same in both) as a recipe key, so that a field added to a model is
# configurable at once and checked like every other key. Frames and resolution are the data's (data.num_frames,
# data.crop). A field left out (null) takes the model's value; loading a recipe fills in the fields of the model's
# family, so a resolved config (the run directory's config.yaml, MLflow's params) names the whole model, and a
# field of another family stays null (setting one is an error that names the family it belongs to).
MODEL_FROM_DATA = {"num_frames": "data.num_frames", "img_size": "data.crop"}
# Model fields that null leaves to the dataset index, settled at launch (launch.check_data) and by a rank that
# finds them unset (a config written in code): multi_label is the index's (several labels per video or one).
MODEL_FROM_DATASET = ("multi_label",)


def settable(source: type, name: str | None = None, *, optional: bool = False, exclude: Any = (),
             first: list[tuple[str, Any, Any]] | None = None, doc: str | None = None) -> type:
    """A config section with the fields of dataclass ``source`` (a frozen value class such as the model's or
    the decoder's limits), for the typed loader, which fills a section layer by layer: the same names and
    types, the same defaults, or with ``optional`` every field ``X | None`` defaulting to None (left to
    another source). ``first``: the section's own fields, before them. ``source(**values)`` gives the frozen
    value back."""

    def default(f: dataclasses.Field) -> Any:
        if optional:
            return field(default=None)
        if f.default_factory is not dataclasses.MISSING:
            return field(default_factory=f.default_factory)
        return field(default=f.default)

    copied = [(f.name, f"{f.type} | None" if optional else f.type, default(f)) for f in fields(source)
              if f.name not in exclude]
    return dataclasses.make_dataclass(
        name or f"{source.__name__}Config", (first or []) + copied,
        namespace={"__module__": __name__, "__doc__": doc or f"{source.__name__}, as configured"})


def _every_model_field() -> type:
    """One dataclass with the fields of every registered family's config, in registration order (the registry
    refuses a shared name with two types)."""
    seen: dict[str, tuple[str, Any, Any]] = {}
    for fam in FAMILIES.values():
        for f in fields(fam.config):
            seen.setdefault(f.name, (f.name, f.type, field(default=None)))
    return dataclasses.make_dataclass("AnyModelConfig", list(seen.values()))


ModelConfig = settable(
    _every_model_field(), "ModelConfig", optional=True, exclude=MODEL_FROM_DATA,
    first=[("variant", str, field(default="timesformer_base")),  # pipeline.models.registry.MODELS
           # "": random; a checkpoint (timm ViT, official .pyth, HF dir, our safetensors): a path, s3://bucket/key
           # or hf-hub:<org>/<name>[@revision], which launch resolves once to the local path the ranks read
           ("init", str, field(default="")),
           # the s3:// or hf-hub: reference model.init was resolved from at launch ("": given as a path)
           ("init_source", str, field(default="")),
           ("init_reset_head", bool, field(default=False))],  # fine-tuning on other classes: a fresh classifier
    doc="The run's model: a registered model (model.variant), its initial weights, and any field of its family's "
        "config (None: the model's own).")
# Resolved configs written before the model section followed TimeSformerConfig used 0 for "the variant's own"
LEGACY_ZERO_MEANS_VARIANT = ("patch_size", "embed_dim", "depth", "num_heads")


def model_fields(cfg: RunConfig) -> set[str]:
    """The model section's fields that belong to the run's model (its family's config, without frames and crop)."""
    return family_of(cfg.model.variant).field_names() - set(MODEL_FROM_DATA)


# What a layer that changes the model's family keeps of the model section: the dataset's facts. The rest (the
# architecture's fields, the initial weights and the normalisation that came with them) was the other family's.
KEPT_ACROSS_FAMILIES = ("num_classes", "multi_label", "in_chans")


def _switch_family(cfg: RunConfig, layer: Any) -> None:
    """Before a layer (a recipe file, the command line) that names a model of another family than the one set so
    far (``inherits: smoke`` then ``model.variant: i3d_tiny``; ``--sweep model.variant=timesformer_tiny,i3d_tiny``),
    clear what the earlier layers set for the other family, so that a recipe can inherit a task and change the
    model. A field of the other family set in the same layer or later is still refused (``fill_model``)."""
    model = layer.get("model") if isinstance(layer, dict) else None
    new = model.get("variant") if isinstance(model, dict) else None
    if not isinstance(new, str) or new not in MODELS or cfg.model.variant not in MODELS:
        return  # an unknown name is refused with the list of models by fill_model
    if family_of(new) is family_of(cfg.model.variant):
        return
    for f in fields(cfg.model):
        if f.name in ("init", "init_source"):
            setattr(cfg.model, f.name, "")
        elif f.name == "init_reset_head":
            setattr(cfg.model, f.name, False)
        elif f.name not in KEPT_ACROSS_FAMILIES and f.name != "variant":
            setattr(cfg.model, f.name, None)


def fill_model(cfg: RunConfig, where: str = "resolved recipe", legacy: bool = False) -> None:
    """Set every model field the recipe left out (None) to its model's value. A field of another family that is
    set is refused (it would silently do nothing). ``legacy``: a config written by an earlier version, where 0
    in ``LEGACY_ZERO_MEANS_VARIANT`` meant the variant's own."""
    m = cfg.model
    if m.variant not in MODELS:
        raise ConfigError(f"{where}: model.variant={shown(m.variant)}: expected one of {', '.join(MODELS)} "
                          "(pipeline.models.registry)")
    fam = family_of(m.variant)
    if legacy and fam.name == "timesformer":
        for name in LEGACY_ZERO_MEANS_VARIANT:
            if getattr(m, name) == 0:
                setattr(m, name, None)
    own = model_fields(cfg)
    foreign = sorted(f.name for f in fields(m) if f.name not in own and f.name not in MODEL_FROM_DATA
                     and f.name not in ("variant", "init", "init_source", "init_reset_head")
                     and getattr(m, f.name) is not None)
    if foreign:
        owners = {n: [f.name for f in FAMILIES.values() if n in f.field_names()] for n in foreign}
        raise ConfigError(f"{where}: model.variant={m.variant} is a {fam.name} model, and "
                          + "; ".join(f"model.{n} belongs to {'/'.join(o)}" for n, o in owners.items())
                          + f": remove it (the {fam.name} fields are {', '.join(sorted(own))})")
    base = {**fam.config().to_dict(), **MODELS[m.variant].overrides}
    for name in own:
        if getattr(m, name) is None and name not in MODEL_FROM_DATASET:
            setattr(m, name, base[name])
    for name in ("mean", "std"):  # one value for every channel (the original's) fits any channel count
        value = getattr(m, name)
        if value and len(set(value)) == 1 and len(value) != m.in_chans:
            setattr(m, name, (value[0],) * m.in_chans)


@dataclass
class DataConfig:
    index: str = ""  # dataset root written by ingest (s3://bucket/prefix or a directory)
    version: int = 0  # dataset index version; 0 = the newest committed one
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "val"  # Kinetics reports the test protocol on its validation set
    sampler: str = "fixed_rate"  # fixed_rate (Kinetics) or segment (SSv2)
    num_frames: int = 8
    sampling_rate: int = 32
    ref_fps: float = 30.0
    crop: int = 224
    scale: list[int] = field(default_factory=lambda: [256, 320])
    flip: bool = True
    num_workers: int = 8  # DataLoader workers per rank
    shuffle_buffer: int = 256
    epoch_clips: int = 0  # clips per epoch; 0 = the train split's sample count
    # broken samples (no clip or metadata, bad metadata, a clip that does not decode) are skipped and
    # counted; a run stops with a clear error when more than this fraction of the samples read are skipped
    max_skip_fraction: float = 0.01
    # RandAugment for video (pipeline.train.augment.RandAugment; docs/training.md "Fine-tuning options"): this
    # many ops per training clip (0 = off, the paper's recipe), each at magnitude randaugment_m of 10; the same
    # ops and magnitudes on every frame of a clip
    randaugment_n: int = 0
    randaugment_m: int = 9


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd (the paper: Nesterov momentum) or adamw
    lr: float = 0.005  # at the global batch below
    momentum: float = 0.9
    nesterov: bool = True
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-4
    decay_embeddings: bool = True  # the original decays every parameter, embeddings included
    schedule: str = "steps"  # steps (the paper: lr *= lr_gamma at lr_steps) or cosine (to 0 at the last step)
    lr_steps: list[float] = field(default_factory=lambda: [11.0, 14.0])  # epochs where lr *= lr_gamma
    lr_gamma: float = 0.1
    warmup_epochs: float = 0.0
    grad_clip: float = 0.0  # max gradient norm; 0 = off (the original does not clip)
    # the classifier head's learning rate is lr x this: a fresh head over a loaded backbone (fine-tuning on a
    # small dataset) learns faster than the features under it should move
    head_lr_scale: float = 1.0
    # layer-wise learning-rate decay: block i's rate is lr x layer_decay^(depth - i), the embeddings' (layer 0)
    # lr x layer_decay^(depth + 1), the final norm and head at lr; 1.0 = off (the paper: one rate)
    layer_decay: float = 1.0


@dataclass
class TrainConfig:
    epochs: float = 15.0
    global_batch: int = 64  # clips per optimizer step, whatever the world size
    micro_batch: int = 1  # clips per rank per forward pass
    max_steps: int = 0  # 0 = epochs x steps per epoch
    precision: str = "fp32"  # fp32 (the paper), bf16, fp16
    zero_stage: int = 2
    activation_checkpointing: str = "full"  # none, full, every_<k>, selective, auto (cheapest that fits, measured)
    memory_fraction: float = 0.9  # of the device's memory that ``auto`` checkpointing plans to fill
    compile: str = "none"  # none, or blocks (torch.compile of each transformer block)
    engine: str = "deepspeed"  # deepspeed, or torch (plain PyTorch DDP: a baseline)
    freeze: str = "none"  # none, or backbone: only the classifier head trains (a linear probe of model.init)
    seed: int = 0
    log_every: int = 20  # steps between metric lines
    val_every: int = 0  # steps between clip-level validations; 0 = once per epoch; -1 = never
    ckpt_every: int = 1000  # steps between checkpoints (also where the data stream is reseeded)
    keep_checkpoints: int = 2
    dist_timeout_s: int = 1800  # a collective waiting longer than this fails (a dead rank)
    # epochs: the schedule runs over train.epochs (or max_steps), a budget only stops it; budget: the run measures
    # its cost per step and fits its number of steps (and the schedule over them) to budget.gpu_hours
    # (pipeline/train/plan.py; docs/training.md "Planning by budget")
    plan_by: str = "epochs"
    calibration_steps: int = 20  # plan_by=budget: steps measured before the fit (after calibration_steps // 4 skipped)
    # Fine-tuning options (docs/training.md "Fine-tuning options"); each off by default, as the paper trains
    label_smoothing: float = 0.0  # targets (1 - e) one-hot + e / classes; multi-label: each class toward 0.5
    mixup_alpha: float = 0.0  # mixup of clip pairs within a micro batch, lambda ~ Beta(a, a); 0 = off
    cutmix_alpha: float = 0.0  # cutmix: one box on every frame of a clip, area ~ Beta(a, a); 0 = off
    mix_prob: float = 1.0  # the fraction of micro batches mixed (when mixup or cutmix is on)
    mix_switch_prob: float = 0.5  # with both on: the chance a mixed batch uses cutmix rather than mixup
    ema_decay: float = 0.0  # an exponential moving average of the weights after each step; 0 = off
    ema_export: bool = True  # with ema_decay: the EMA weights are what is tested and exported
    keep_best: bool = False  # test and export the checkpoint with the best validation accuracy (mAP), not the last


@dataclass
class TestConfig:
    __test__ = False  # not a pytest class

    enabled: bool = True
    protocol: str = "multi_view"  # multi_view: k clips x crops per video; long_video: all covering clips
    temporal_clips: int = 1
    spatial_crops: int = 3
    # the test views' size: the short side scaled to it, then the crops (0: data.crop). The paper's 3D CNNs test
    # at 256 after training at 224 (PySlowFast's TEST_CROP_SIZE); a TimeSformer tests at its training size
    crop: int = 0
    batch_size: int = 8  # views per forward pass
    max_videos: int = 0  # 0 = all


@dataclass
class BudgetConfig:
    gpu_hours: float = 0.0  # stop cleanly at this many accelerator-hours; 0 = no budget
    # train.plan_by=budget: the fit aims at gpu_hours - plan_margin x the hours left (the projection's error,
    # which shrinks as the end nears); it re-fits when the plan's projected end falls short of that aim by more
    # than one step and by more than refit_drift of the hours it has left, or passes it by more than that share
    plan_margin: float = 0.02
    refit_drift: float = 0.05


@dataclass
class TrackingConfig:
    uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite in the runs directory
    experiment: str = ""  # "" = the recipe name
    register: bool = True  # at the end: the model in MLflow's model registry, under the recipe's name


@dataclass
class ClusterConfig:
    accelerator: str = "gpu"  # gpu, or cpu (DeepSpeed on gloo; the development cluster)
    gpus_per_node: int = 8  # ranks per node (one per GPU)
    partition: str = ""
    time_min: int = 72 * 60
    cpus_per_task: int = 10
    mem_gb: int = 0  # 0 = the partition's default
    account: str = ""
    qos: str = ""
    constraint: str = ""
    signal_delay_s: int = 120  # Slurm sends USR2 this long before the time limit: checkpoint, requeue
    max_requeues: int = 20
    env: dict[str, str] = field(default_factory=dict)  # exported on every rank (NCCL settings, ...)
    setup: list[str] = field(default_factory=list)  # shell lines before srun (module load, ...)


@dataclass
class RunConfig:
    name: str = ""  # run name; "" = <recipe>-<timestamp>
    recipe: str = ""
    description: str = ""
    runs_dir: str = "runs"  # run directories are created here
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    test: TestConfig = field(default_factory=TestConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def to_dict(self) -> dict[str, Any]:
        """The resolved tree; the model section without the fields of other model families (all null)."""
        d = dataclasses.asdict(self)
        if self.model.variant in MODELS:
            own = model_fields(self) | {"variant", "init", "init_source", "init_reset_head"}
            d["model"] = {k: v for k, v in d["model"].items() if k in own or v is not None}
        return d

    def flat(self) -> dict[str, Any]:
        """``{"train.zero_stage": 2, ...}``: the resolved tree as dotted keys (MLflow params)."""
        out: dict[str, Any] = {}

        def walk(d: dict[str, Any], prefix: str) -> None:
            for k, v in d.items():
                if isinstance(v, dict) and k != "env":
                    walk(v, f"{prefix}{k}.")
                else:
                    out[f"{prefix}{k}"] = v
        walk(self.to_dict(), "")
        return out


# -- typed loading ---------------------------------------------------------------------------------

# error messages quote what was given, shortened: a YAML alias bomb (a few hundred bytes whose aliases
# unfold to billions of items) or a megabyte string must not become the message itself
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxtuple, _SHOWN.maxdict = 2, 6, 6, 6
_SHOWN.maxstring = _SHOWN.maxother = 160


def shown(value: Any) -> str:
    """``repr(value)``, bounded in size and depth (for error messages)."""
    return _SHOWN.repr(value)


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (PyYAML keeps the last silently:
    ``optim: {lr: 0.1}`` written twice would drop the first without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # '<<' merges are YAML's own way of overriding; complex keys are refused later
            key = self.construct_object(key_node)
            with contextlib.suppress(TypeError):
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {shown(key)} appears twice in one mapping (first at line {seen[key]})",
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def yaml_load(text: str) -> Any:
    """A YAML document read the way recipes and overrides are: safe (no tags that run code), and a key
    written twice in one mapping is an error instead of a silent overwrite."""
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 -- _RecipeLoader is a SafeLoader


def _check_value(value: Any, tp: Any, where: str, key: str) -> Any:
    """``value`` as type ``tp`` (ints accepted for floats), or a ConfigError naming where and which key."""
    origin = typing.get_origin(tp)

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{where}: {key}={shown(value)} ({type(value).__name__}): expected {expected}")

    if origin in (typing.Union, types.UnionType):  # ``X | None``: null leaves the value to its default source
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _check_value(value, inner, where, key)

    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot, unsigned exponent) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        if not math.isfinite(value):  # .nan, .inf, "nan", 1e999: every float field is a finite quantity
            raise bad("a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if origin is tuple:  # tuple[X, ...]: a list in YAML, held as a tuple (a model config is frozen)
        item = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise bad(f"a list of {item.__name__}")
        return tuple(_check_value(v, item, where, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise bad(f"a list of {item.__name__}")
        return [_check_value(v, item, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        for k, v in value.items():
            if v is None or isinstance(v, (dict, list)):
                raise ConfigError(f"{where}: {key}.{k}={shown(v)}: expected a string or a number (an environment "
                                  "value)")
        return {str(k): str(v) for k, v in value.items()}
    raise TypeError(f"unsupported config type {tp} for {key}")  # a schema bug, not a user error


def apply_layer(obj: Any, data: dict[str, Any], where: str, prefix: str = "") -> None:
    """Set the fields of dataclass ``obj`` from ``data``, checking names and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'the recipe'} must be a mapping, got {shown(data)}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{where}: unknown key {shown(dotted)}; known keys under "
                              f"{prefix.rstrip('.') or 'the top level'}: {', '.join(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            apply_layer(current, value, where, f"{dotted}.")
        else:
            setattr(obj, key, _check_value(value, hints[key], where, dotted))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.zero_stage=3", "data.scale=[448,512]"]`` -> a nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"command line: {item!r}: expected key=value (e.g. train.zero_stage=3)")
        target = out
        parts = key.split(".")
        for p in parts[:-1]:
            target = target.setdefault(p, {})
            if not isinstance(target, dict):
                raise ConfigError(f"command line: {item!r} conflicts with an earlier override of {p}")
        try:
            target[parts[-1]] = yaml_load(value)
        except (yaml.YAMLError, RecursionError) as e:
            raise ConfigError(f"command line: {item!r}: the value is not valid YAML ({_yaml_problem(e)}); "
                              "put a string that holds YAML syntax in quotes") from None
    return out


def _yaml_problem(e: BaseException) -> str:
    """One line from a YAML error (PyYAML's own message spans several lines with a caret drawing)."""
    if isinstance(e, RecursionError):
        return "nested too deeply"
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def read_yaml(path: Path, what: str) -> Any:
    """The YAML document in ``path``, or a one-line ConfigError naming the file and the problem."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read this {what} ({type(e).__name__}: {e})") from None
    try:
        return yaml_load(text)
    except (yaml.YAMLError, RecursionError) as e:
        raise ConfigError(f"{path}: this {what} is not valid YAML ({_yaml_problem(e)})") from None


def recipe_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    candidate = RECIPES_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    raise ConfigError(f"recipe {name_or_path!r} not found: not a file, and no {candidate}; "
                      f"known recipes: {', '.join(list_recipes())}")


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def _layers(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, dict[str, Any]]]:
    """The YAML layers of a recipe, parents first: [(file, mapping without 'inherits'), ...]."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'inherits' forms a cycle: {' -> '.join(str(p.name) for p in (*seen, path))}")
    data = read_yaml(path, "recipe") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    parents = data.pop("inherits", [])
    parents = [parents] if isinstance(parents, str) else parents
    if not isinstance(parents, list) or not all(isinstance(p, str) and p for p in parents):
        raise ConfigError(f"{path}: inherits={shown(parents)}: expected a recipe name or a list of recipe names")
    layers: list[tuple[str, dict[str, Any]]] = []
    for parent in parents:
        try:
            ppath = recipe_path(parent) if not (path.parent / f"{parent}.yaml").is_file() \
                else path.parent / f"{parent}.yaml"
        except ConfigError as e:
            raise ConfigError(f"{path}: inherits {parent!r}: {e}") from None
        layers.extend(_layers(ppath, (*seen, path)))
    layers.append((str(path), data))
    return layers


def load_recipe(name_or_path: str, overrides: list[str] | None = None,
                extra_files: list[str] | None = None) -> RunConfig:
    """Resolve a recipe (a name under configs/recipes or a YAML path), then ``extra_files`` (a cluster
    file such as configs/clusters/example_gpu.yaml), then overrides; validate the result."""
    path = recipe_path(name_or_path)
    cfg = RunConfig()
    layers = _layers(path)
    for extra in extra_files or []:
        if not Path(extra).is_file():
            raise ConfigError(f"cluster/extra config {extra!r} not found")
        layers.extend(_layers(Path(extra)))
    if overrides:
        layers.append(("command line", parse_overrides(overrides)))
    for where, layer in layers:
        _switch_family(cfg, layer)
        apply_layer(cfg, layer, where)
    if not cfg.recipe:
        cfg.recipe = path.stem
    fill_model(cfg, f"recipe {cfg.recipe!r}")
    validate(cfg)
    return cfg


def from_dict(data: dict[str, Any], where: str = "config") -> RunConfig:
    """A resolved config written earlier (the run directory's config.yaml)."""
    cfg = RunConfig()
    apply_layer(cfg, data, where)
    fill_model(cfg, where, legacy=True)
    validate(cfg, where)
    return cfg


def load_resolved(path: str | Path) -> RunConfig:
    """A run directory's ``config.yaml``; a missing, unreadable or broken file is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (a run directory made by jobs/launch.py holds config.yaml)")
    data = read_yaml(path, "run config")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a run config is a mapping of sections, got {type(data).__name__}")
    return from_dict(data, where=str(path))


def dump(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# -- validation and derived values -------------------------------------------------------------------


def _choice(value: Any, choices: tuple, key: str, where: str) -> None:
    if value not in choices:
        raise ConfigError(f"{where}: {key}={shown(value)}: expected one of {', '.join(map(str, choices))}")


RUN_NAME_RULE = ("letters, digits, '.', '_' and '-', at most 128 characters, starting with a letter, a digit or "
                 "'_' (it names a directory under runs_dir)")
_RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_run_name(name: str, what: str = "name", *, existing: bool = False) -> None:
    """Refuse a run name that could leave the runs directory (``../x``, ``a/b``) or break a shell or an
    sbatch line (spaces, control characters). ``existing``: the name of a run directory made before this
    rule (``k400 lr=1e-4`` was allowed then); only what could escape the runs directory is refused."""
    if existing and isinstance(name, str) and name not in (".", "..") and "/" not in name and "\0" not in name \
            and name.isprintable() and len(name) <= 255:
        return
    if not isinstance(name, str) or not _RUN_NAME.fullmatch(name):
        raise ConfigError(f"{what}={shown(name)}: expected {RUN_NAME_RULE}")


def _fields(section: Any, prefix: str) -> dict[str, Any]:
    return {f"{prefix}.{f.name}": getattr(section, f.name) for f in dataclasses.fields(section)}


# minimum of every integer field (a count, a size, a period); the schema test checks every int is listed
INT_MINIMUMS: dict[str, tuple[int, str]] = {
    "model.num_classes": (1, "a positive number of classes"),
    "model.patch_size": (1, "a positive integer (or null: the variant's own)"),
    "model.embed_dim": (1, "a positive integer (or null: the variant's own)"),
    "model.depth": (1, "a positive integer (or null: the variant's own)"),
    "model.num_heads": (1, "a positive integer (or null: the variant's own)"),
    "model.in_chans": (3, "3: clips are decoded as RGB"),
    # the 3D CNNs' (pipeline.models.resnet3d_config; its config checks the combinations)
    "model.stem_width": (1, "a positive number of channels (or null: the model's own)"),
    "model.stem_temporal_kernel": (1, "a positive kernel size in frames (or null: the model's own)"),
    "model.bottleneck_width": (1, "a positive number of channels (or null: the model's own)"),
    "model.bottleneck_expansion": (1, "a positive factor (or null: the model's own)"),
    "model.temporal_pool": (1, "a positive pooling stride in frames, 1: none (or null: the model's own)"),
    "data.version": (0, "an integer >= 0 (0: the newest committed version)"),
    "data.num_frames": (1, "a positive integer"),
    "data.sampling_rate": (1, "a positive integer"),
    "data.crop": (1, "a positive integer"),
    "test.crop": (0, "a size in pixels, or 0: data.crop"),
    "data.num_workers": (0, "an integer >= 0 (0: load in the training process)"),
    "data.shuffle_buffer": (0, "an integer >= 0 (0 or 1: no shuffle buffer)"),
    "data.epoch_clips": (0, "an integer >= 0 (0: the train split's sample count)"),
    "data.randaugment_n": (0, "an integer >= 0 (ops per clip; 0: no RandAugment)"),
    "data.randaugment_m": (0, "a magnitude in 0..10"),
    "train.global_batch": (1, "a positive integer"),
    "train.micro_batch": (1, "a positive integer"),
    "train.max_steps": (0, "an integer >= 0 (0: epochs x steps per epoch)"),
    "train.zero_stage": (0, "0, 1, 2 or 3"),
    "train.seed": (0, "an integer >= 0"),
    "train.log_every": (1, "a positive number of steps"),
    "train.val_every": (-1, "a number of steps, 0 (once per epoch) or -1 (never)"),
    "train.ckpt_every": (1, "a positive number of steps"),
    "train.keep_checkpoints": (0, "an integer >= 0 (0: keep every checkpoint)"),
    "train.dist_timeout_s": (1, "a positive number of seconds"),
    "train.calibration_steps": (1, "a positive number of steps"),
    "test.temporal_clips": (1, "a positive integer"),
    "test.spatial_crops": (1, "1 or 3"),
    "test.batch_size": (1, "a positive integer"),
    "test.max_videos": (0, "an integer >= 0 (0: every video)"),
    "cluster.gpus_per_node": (1, "a positive number of ranks per node"),
    "cluster.time_min": (1, "a positive number of minutes"),
    "cluster.cpus_per_task": (1, "a positive integer"),
    "cluster.mem_gb": (0, "an integer >= 0 (0: the partition's default)"),
    "cluster.signal_delay_s": (0, "an integer >= 0 seconds"),
    "cluster.max_requeues": (0, "an integer >= 0"),
}
# maximum of integer fields where a typo (an extra digit or three) would exhaust a node rather than fail
INT_MAXIMUMS: dict[str, tuple[int, str]] = {
    "data.num_workers": (256, "at most 256 DataLoader workers per rank (each is a process)"),
    "model.in_chans": (3, "3: clips are decoded as RGB"),
    "data.randaugment_n": (16, "at most 16 ops per clip (2 or 3 is usual)"),
    "data.randaugment_m": (10, "a magnitude in 0..10 (10: each op's strongest)"),
}
# a model no recipe comes near (TimeSformer-L has 121M parameters): above it, model.* or data.* holds a typo,
# and building it would exhaust the ranks' memory after the run was created
MAX_MODEL_PARAMETERS = 10**11
# (low, low inclusive, high, high inclusive) of every float field; None: unbounded on that side
FLOAT_RANGES: dict[str, tuple[float | None, bool, float | None, bool]] = {
    "model.drop_path_rate": (0.0, True, 1.0, False),
    "model.time_embed_init_std": (0.0, True, 1.0, True),
    "model.drop_rate": (0.0, True, 1.0, False),
    "model.attn_drop_rate": (0.0, True, 1.0, False),
    "model.mlp_ratio": (0.0, False, None, False),
    "model.norm_eps": (0.0, False, None, False),
    "model.head_dropout": (0.0, True, 1.0, False),
    "model.bn_eps": (0.0, False, None, False),
    "data.ref_fps": (0.0, False, None, False),
    "data.max_skip_fraction": (0.0, True, 1.0, True),
    "optim.lr": (0.0, False, None, False),
    "optim.momentum": (0.0, True, 1.0, False),
    "optim.weight_decay": (0.0, True, None, False),
    "optim.lr_gamma": (0.0, False, None, False),
    "optim.warmup_epochs": (0.0, True, None, False),
    "optim.grad_clip": (0.0, True, None, False),
    "optim.head_lr_scale": (0.0, False, None, False),
    "optim.layer_decay": (0.0, False, 1.0, True),
    "train.label_smoothing": (0.0, True, 1.0, False),
    "train.mixup_alpha": (0.0, True, None, False),
    "train.cutmix_alpha": (0.0, True, None, False),
    "train.mix_prob": (0.0, True, 1.0, True),
    "train.mix_switch_prob": (0.0, True, 1.0, True),
    "train.ema_decay": (0.0, True, 1.0, False),
    "train.epochs": (0.0, False, None, False),
    "train.memory_fraction": (0.0, False, 1.0, True),
    "budget.gpu_hours": (0.0, True, None, False),
    "budget.plan_margin": (0.0, True, 0.5, False),
    "budget.refit_drift": (0.0, False, 1.0, True),
}
# string fields written into #SBATCH lines: a newline there would start a line of its own in the script
SBATCH_STRINGS = ("cluster.partition", "cluster.account", "cluster.qos", "cluster.constraint")


def _describe_range(low: float | None, low_in: bool, high: float | None, high_in: bool) -> str:
    if high is None:
        return "a number >= 0" if low_in else "a positive number"
    return f"a number in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def _in_range(value: float, low: float | None, low_in: bool, high: float | None, high_in: bool) -> bool:
    ok = low is None or (value >= low if low_in else value > low)
    return ok and (high is None or (value <= high if high_in else value < high))


def validate(cfg: RunConfig, where: str = "resolved recipe") -> None:
    """Every field of ``cfg`` against its meaning: choices, ranges, combinations. The first problem is a
    one-line ConfigError naming the field, its value and what is expected."""
    from pipeline.models.checkpointing import parse_checkpoint_policy
    from pipeline.models.config import ATTENTION_TYPES, POS_EMBED_TYPES

    where = f"{where} {cfg.recipe!r}" if cfg.recipe else where
    fill_model(cfg, where)  # a config built in code may leave model fields to the variant too
    values: dict[str, Any] = {}
    for name in ("model", "data", "optim", "train", "test", "budget", "tracking", "cluster"):
        values.update(_fields(getattr(cfg, name), name))
    own = model_fields(cfg)  # another family's fields are null (fill_model refused any set); its config checks them
    values = {k: v for k, v in values.items() if not k.startswith("model.") or k.split(".", 1)[1] in own
              or k.split(".", 1)[1] in ("variant", "init", "init_source", "init_reset_head")}

    def refuse(key: str, expected: str) -> ConfigError:
        return ConfigError(f"{where}: {key}={shown(values.get(key))}: expected {expected}")

    for key, (low, expected) in INT_MINIMUMS.items():
        if key in values and values[key] < low:
            raise refuse(key, expected)
    for key, bounds in FLOAT_RANGES.items():
        # NaN fails every comparison; _check_value refused it already
        if key in values and not _in_range(values[key], *bounds):
            raise refuse(key, _describe_range(*bounds))
    if "stage_blocks" in own and cfg.cluster.accelerator == "cpu" and cfg.train.precision != "fp32":
        # measured here (torch 2.13, CPU): oneDNN's half-precision 3D convolutions gave non-finite gradients at the
        # first steps of i3d_tiny, at random; the same run with oneDNN off or in fp32 trains
        raise refuse("train.precision", "fp32 for a 3D CNN on CPU ranks (cluster.accelerator=cpu): PyTorch's CPU "
                     "(oneDNN) bf16/fp16 3D convolutions gave non-finite gradients in training; bf16 is for GPUs")
    if cfg.test.crop and "patch_size" in own and cfg.test.crop % cfg.model.patch_size:
        raise refuse("test.crop", f"a multiple of model.patch_size={cfg.model.patch_size} (or 0: data.crop)")
    if "attention_type" in own:  # TimeSformer's choices; other families' configs check their own
        _choice(cfg.model.attention_type, ATTENTION_TYPES, "model.attention_type", where)
        _choice(cfg.model.pos_embed, POS_EMBED_TYPES, "model.pos_embed", where)
        _choice(cfg.model.pos_embed_resize, ("nearest", "bilinear", "bicubic"), "model.pos_embed_resize", where)
        _choice(cfg.model.time_embed_resize, ("nearest", "linear"), "model.time_embed_resize", where)
    _choice(cfg.data.sampler, ("fixed_rate", "segment"), "data.sampler", where)
    _choice(cfg.optim.name, ("sgd", "adamw"), "optim.name", where)
    _choice(cfg.optim.schedule, ("steps", "cosine"), "optim.schedule", where)
    _choice(cfg.train.precision, ("fp32", "bf16", "fp16"), "train.precision", where)
    _choice(cfg.train.zero_stage, (0, 1, 2, 3), "train.zero_stage", where)
    _choice(cfg.train.engine, ("deepspeed", "torch"), "train.engine", where)
    _choice(cfg.train.compile, ("none", "blocks"), "train.compile", where)
    _choice(cfg.train.freeze, ("none", "backbone"), "train.freeze", where)
    _choice(cfg.train.plan_by, ("epochs", "budget"), "train.plan_by", where)
    if cfg.train.plan_by == "budget" and cfg.budget.gpu_hours <= 0:
        raise ConfigError(f"{where}: train.plan_by=budget fits the run to budget.gpu_hours, which is "
                          f"{cfg.budget.gpu_hours:g} (no budget): set budget.gpu_hours, or train.plan_by=epochs")
    _choice(cfg.test.protocol, ("multi_view", "long_video"), "test.protocol", where)
    _choice(cfg.test.spatial_crops, (1, 3), "test.spatial_crops", where)
    _choice(cfg.cluster.accelerator, ("gpu", "cpu"), "cluster.accelerator", where)
    try:
        if cfg.train.activation_checkpointing != "auto":
            parse_checkpoint_policy(cfg.train.activation_checkpointing)
    except ValueError as e:
        raise ConfigError(f"{where}: train.activation_checkpointing: {e}") from None
    for key in ("model.mean", "model.std"):
        stats = values[key]
        if len(stats) != cfg.model.in_chans or (key == "model.std" and min(stats) <= 0):
            raise refuse(key, f"{cfg.model.in_chans} numbers, one per input channel"
                         + (", each positive" if key == "model.std" else "") + " ((x / 255 - mean) / std)")
    if cfg.train.seed >= 2**63:
        raise refuse("train.seed", "an integer below 2**63")
    if len(cfg.data.scale) != 2 or min(cfg.data.scale) < 1 or cfg.data.scale[0] > cfg.data.scale[1]:
        raise ConfigError(f"{where}: data.scale={cfg.data.scale}: expected [min, max] positive short-side sizes")
    if cfg.data.scale[1] < cfg.data.crop:
        raise ConfigError(f"{where}: data.scale={cfg.data.scale} is below data.crop={cfg.data.crop}")
    for key in ("data.train_split", "data.val_split", "data.test_split"):
        if not values[key].strip():
            raise refuse(key, "a split name (train, val, test, ...)")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise refuse("optim.betas", "two numbers in [0, 1) (Adam's beta1, beta2)")
    if any(e < 0 for e in cfg.optim.lr_steps) or sorted(cfg.optim.lr_steps) != list(cfg.optim.lr_steps):
        raise ConfigError(f"{where}: optim.lr_steps={cfg.optim.lr_steps}: expected increasing epochs >= 0")
    if cfg.train.zero_stage > 0 and cfg.train.engine == "torch":
        raise ConfigError(f"{where}: train.engine=torch has no ZeRO; set train.zero_stage=0 or engine=deepspeed")
    _check_finetune_options(cfg, where)
    # space_only with pos_embed=space_time is valid: that scheme has no time embedding (as the original)
    if cfg.cluster.signal_delay_s >= cfg.cluster.time_min * 60:
        raise ConfigError(f"{where}: cluster.signal_delay_s={cfg.cluster.signal_delay_s} is not shorter than "
                          f"cluster.time_min={cfg.cluster.time_min} minutes: the stop signal would come at the start")
    for key in SBATCH_STRINGS:
        if any(ch.isspace() or not ch.isprintable() for ch in values[key]):
            raise refuse(key, "a Slurm name without spaces or control characters")
    for name, value in cfg.cluster.env.items():
        if not _ENV_NAME.fullmatch(name):
            raise ConfigError(f"{where}: cluster.env has the name {name!r}: expected a shell variable name "
                              "(letters, digits and '_', not starting with a digit)")
        if "\0" in value:
            raise ConfigError(f"{where}: cluster.env.{name} holds a NUL character, which no environment can carry")
    if cfg.name:
        try:  # the full rule is launch's, for new runs; a run directory made earlier keeps its name
            check_run_name(cfg.name, existing=True)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    for key, (high, expected) in INT_MAXIMUMS.items():
        if key in values and values[key] > high:
            raise refuse(key, expected)
    from pipeline.data.video import DEFAULT_LIMITS

    # above the decode limit every clip would be refused, and counted as bad data rather than a bad recipe
    if cfg.data.num_frames > DEFAULT_LIMITS.max_clip_frames:
        raise refuse("data.num_frames", f"at most {DEFAULT_LIMITS.max_clip_frames} frames per clip (the decode "
                     "limit max_clip_frames, pipeline.data.video.DecodeLimits)")
    if not cfg.data.index:
        raise ConfigError(f"{where}: data.index is empty: give the dataset root that ingest wrote "
                          f"(data.index=s3://bucket/datasets/k400 or a directory)")


def _check_finetune_options(cfg: RunConfig, where: str) -> None:
    """The fine-tuning options' combinations that cannot work (each value's range is checked above)."""
    t = cfg.train
    mixing = t.mixup_alpha > 0 or t.cutmix_alpha > 0
    if mixing and t.micro_batch < 2:
        raise ConfigError(f"{where}: train.mixup_alpha={t.mixup_alpha:g}, train.cutmix_alpha={t.cutmix_alpha:g} mix "
                          f"the clips of a micro batch with each other, and train.micro_batch=1 has nothing to mix "
                          f"with: set train.micro_batch >= 2 (or mixup_alpha=0 cutmix_alpha=0)")
    if mixing and t.mix_prob == 0:
        raise ConfigError(f"{where}: train.mix_prob=0 with mixup_alpha={t.mixup_alpha:g} or cutmix_alpha="
                          f"{t.cutmix_alpha:g} mixes nothing: set mix_prob in (0, 1], or the alphas to 0")
    if t.ema_decay > 0 and t.engine == "deepspeed" and t.zero_stage == 3:
        raise ConfigError(f"{where}: train.ema_decay={t.ema_decay:g} needs every weight on every rank, and ZeRO stage "
                          f"3 partitions them: use train.zero_stage=0, 1 or 2 with EMA (or ema_decay=0)")
    if t.keep_best and t.val_every == -1:
        raise ConfigError(f"{where}: train.keep_best=true chooses a checkpoint by validation accuracy, and "
                          f"train.val_every=-1 never validates: set val_every (0: once per epoch) or keep_best=false")


def _last_map_cells(mc: Any) -> int | None:
    """Values per channel per clip in a 3D CNN's last stage (frames after its temporal pool x the 32x smaller
    frame); None for a model without batch statistics (TimeSformer normalises each token on its own)."""
    if not hasattr(mc, "temporal_pool"):
        return None
    frames = max(1, mc.num_frames // mc.temporal_pool)
    side = max(1, math.ceil(mc.img_size / 32))
    return frames * side * side


def check_model(cfg: RunConfig) -> Any:
    """The model config the recipe builds (its family's: ``TimeSformerConfig``, ``ResNet3DConfig``...), or a
    ConfigError saying which model field combination cannot be built (a width that the heads do not divide, a patch
    the crop does not fit)."""
    from pipeline.models.registry import model_config, parameter_count

    try:
        mc = model_config(cfg)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"recipe {cfg.recipe!r}: the model cannot be built: {e} (model.* and data.num_frames, "
                          "data.crop)") from None
    cells = _last_map_cells(mc)
    if cells is not None and cfg.train.micro_batch * cells < 2:
        raise ConfigError(f"recipe {cfg.recipe!r}: train.micro_batch={cfg.train.micro_batch} clip(s) of "
                          f"{mc.num_frames}x{mc.img_size} leave one value per channel in the model's last BatchNorm "
                          f"layers, which cannot normalise a single value in training: raise train.micro_batch, "
                          f"data.num_frames or data.crop")
    params = parameter_count(mc)
    if params > MAX_MODEL_PARAMETERS:
        shape = (f"embed_dim {mc.embed_dim}, depth {mc.depth}, {mc.num_patches} patches, "
                 if hasattr(mc, "embed_dim") else "")
        raise ConfigError(f"recipe {cfg.recipe!r}: the model would have {params:.3g} parameters ({shape}"
                          f"{mc.num_frames} frames, {mc.num_classes} classes), over {MAX_MODEL_PARAMETERS:.0e}: check "
                          "model.*, data.crop, data.num_frames and model.num_classes")
    return mc


@dataclass(frozen=True)
class BatchPlan:
    """How the recipe's global batch is met on ``world_size`` ranks."""

    world_size: int
    micro_batch: int
    grad_accum: int
    global_batch: int

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = micro batch {self.micro_batch} x accumulation "
                f"{self.grad_accum} x {self.world_size} rank(s)")


def batch_plan(cfg: RunConfig, world_size: int) -> BatchPlan:
    """Gradient accumulation so that the global batch is the recipe's; a refusal says what would work."""
    per_step = cfg.train.micro_batch * world_size
    gb = cfg.train.global_batch
    if gb % per_step:
        # the hint looks at sizes up to 4096 and names at most 16 of each: a global batch of 10**12 must
        # get its one-line refusal at once, not after a trillion divisions
        search = range(1, min(gb, 4096) + 1)
        fits = [w for w in search if gb % (cfg.train.micro_batch * w) == 0][:16]
        micro = [m for m in search if gb % (m * world_size) == 0][:16]
        hint = (f"world sizes that work with micro batch {cfg.train.micro_batch}: {fits}" if fits else
                f"no world size works with micro batch {cfg.train.micro_batch}")
        alt = f"; or train.micro_batch in {micro}" if micro else ""
        raise ConfigError(
            f"recipe {cfg.recipe!r}: train.global_batch={gb} cannot be met on {world_size} rank(s) with "
            f"train.micro_batch={cfg.train.micro_batch} (needs global_batch divisible by micro_batch x ranks = "
            f"{per_step}). {hint}{alt}.")
    return BatchPlan(world_size, cfg.train.micro_batch, gb // per_step, gb)


def steps_per_epoch(cfg: RunConfig, train_samples: int) -> int:
    clips = cfg.data.epoch_clips or train_samples
    return max(1, clips // cfg.train.global_batch)


def total_steps(cfg: RunConfig, train_samples: int) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * steps_per_epoch(cfg, train_samples)))


def lr_factor(cfg: RunConfig, step: int, per_epoch: int) -> float:
    """The learning-rate multiplier at optimizer step ``step``: linear warm-up, then the paper's steps at
    epochs (or a cosine decay to zero at the run's last step)."""
    epoch = step / per_epoch
    o = cfg.optim
    if o.warmup_epochs > 0 and epoch < o.warmup_epochs:
        return (epoch + 1.0 / per_epoch) / o.warmup_epochs
    if o.schedule == "cosine":
        total = cfg.train.max_steps or math.ceil(cfg.train.epochs * per_epoch)
        start = o.warmup_epochs * per_epoch
        progress = min(1.0, max(0.0, (step - start) / max(1.0, total - start)))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return o.lr_gamma ** sum(1 for e in o.lr_steps if epoch >= e)
