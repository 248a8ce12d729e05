"""The stage table: every stage of an experiment, one row each. The one owner of what a stage is.

Spec validation, the planner, `--stages`, the CLI's choices, the run-directory layout and the
fingerprints read this table; nothing else compares a string to a stage name. To add a stage,
add its row here (ARCHITECTURE.md lists the other files a new stage touches).

    name    kind    shared  section  data kind  starts from          backends
    import  import  yes     -        -          -                    megatron, hf
    data    data    yes     -        -          -                    megatron, hf
    cpt     train   no      cpt      blend      the base             megatron, hf
    sft     train   no      sft      chat       cpt's merged model   megatron, hf
    dpo     train   no      dpo      preference sft's merged model   hf (optional: only with --stages ...,dpo)
    export  export  no      -        -          (one per trained)    megatron, hf
    eval    eval    no      eval     -          -                    megatron, hf
"""

from __future__ import annotations

from dataclasses import dataclass

# What a stage does; the runner (jp_peft.run.entry) dispatches on this, never on a name.
IMPORT, DATA, TRAIN, EXPORT, EVAL = "import", "data", "train", "export", "eval"
# What a trained stage's data section holds: a weighted blend of indexed text (pre-training loss on
# every token), chat/instruction JSONL (loss on the assistant's tokens), or preference pairs
# (prompt, chosen, rejected JSONL: a preference loss, DPO).
BLEND, CHAT, PREFERENCE = "blend", "chat", "preference"
BACKEND_NAMES = ("megatron", "hf")  # jp_peft.backends.registry holds one implementation per name


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str
    # Written under the group directory and shared by every run of a sweep (import, data).
    shared: bool = False
    # The spec section the stage owns (a StageSpec for trained stages), or None.
    section: str | None = None
    data_kind: str | None = None
    # Trained stages it starts from, nearest first: the first one the run has gives its merged model
    # (SFT after CPT starts from CPT's merged model); none in the run: the base model.
    starts_from: tuple[str, ...] = ()
    backends: tuple[str, ...] = BACKEND_NAMES
    # Spec sections that count for this stage's fingerprint beyond what every stage counts (training
    # fields): the eval stage's record is current only for the same eval section.
    fingerprint_sections: tuple[str, ...] = ()
    # Optional stages are not in a run's default stages (ExperimentSpec.stages): `--stages ...,dpo` adds one.
    # Their section counts for fingerprints only when the run has the stage (records/fingerprint.py).
    optional: bool = False
    # Why a backend outside `backends` cannot run the stage, and the way out: what spec validation says.
    refused: tuple[tuple[str, str], ...] = ()
    # What the stage does, in a few words (model cards, `jp-peft status`).
    what: str = ""


TABLE: tuple[Stage, ...] = (
    Stage("import", IMPORT, shared=True),
    Stage("data", DATA, shared=True),
    Stage("cpt", TRAIN, section="cpt", data_kind=BLEND, what="continual pre-training on a Japanese/English blend"),
    Stage("sft", TRAIN, section="sft", data_kind=CHAT, starts_from=("cpt",),
          what="Japanese instruction tuning (ChatML)"),
    Stage("dpo", TRAIN, section="dpo", data_kind=PREFERENCE, starts_from=("sft", "cpt"), backends=("hf",),
          optional=True, what="preference tuning (DPO, TRL) on Japanese chosen/rejected pairs",
          refused=(("megatron", "NeMo 2.7.3's nemo.collections.llm has no DPO (NeMo-Aligner is deprecated); "
                                "run it with --backend hf, or use NeMo RL for DPO on Megatron"),)),
    Stage("export", EXPORT),
    Stage("eval", EVAL, section="eval", fingerprint_sections=("eval",)),
)
BY_NAME = {stage.name: stage for stage in TABLE}

# Names in the order a run goes through them (an export runs after each trained stage).
STAGES = tuple(stage.name for stage in TABLE)
# What a run has when it names no stages: every stage but the optional ones.
DEFAULT_STAGES = tuple(stage.name for stage in TABLE if not stage.optional)
SHARED_STAGES = tuple(stage.name for stage in TABLE if stage.shared)
TRAINED_STAGES = tuple(stage.name for stage in TABLE if stage.kind == TRAIN)


def stage(name: str) -> Stage:
    """The row of a stage; an unknown name is a ValueError naming the known ones."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; the stages are {', '.join(STAGES)}") from None


def of_kind(kind: str) -> tuple[str, ...]:
    return tuple(s.name for s in TABLE if s.kind == kind)


def is_trained(name: str) -> bool:
    return stage(name).kind == TRAIN


def trained_with(data_kind: str) -> tuple[str, ...]:
    """The trained stages whose data section holds `data_kind` (BLEND, CHAT or PREFERENCE)."""
    return tuple(s.name for s in TABLE if s.kind == TRAIN and s.data_kind == data_kind)


def previous_trained(name: str, stages_in_run) -> str | None:
    """The trained stage whose merged model `name` starts from in a run of `stages_in_run`, or None (the base)."""
    return next((s for s in stage(name).starts_from if s in stages_in_run), None)


def single_stage(kind: str) -> str:
    """The one stage of a kind that has only one (import, data, export, eval)."""
    (name,) = of_kind(kind)
    return name


def refusal(name: str, backend: str) -> str | None:
    """Why `backend` cannot run stage `name` and what to do instead (one line), or None where it can."""
    row = stage(name)
    if backend in row.backends:
        return None
    why = dict(row.refused).get(backend)
    head = f"the {name} stage runs on the {' or '.join(row.backends)} backend, not {backend}"
    return f"{head}: {why} (or drop {name} from --stages)" if why else \
        f"{head} (--backend {row.backends[0]}, or drop {name} from --stages)"
