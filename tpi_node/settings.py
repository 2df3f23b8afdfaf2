"""Settings: one frozen dataclass per command family, every flag declared once, merged in one place.

A setting is a dataclass field declared with `setting(default, help, ...)` in exactly one option
group below; a command family (ServeSettings, JoinSettings, ...) is the union of its groups.
Each setting comes from, highest first:

    the flag (--grpc-port)  >  $TPI_GRPC_PORT  >  the --config YAML key (grpc_port / grpc-port)  >  default

The flag's converter and choices check every source alike, so a bad value in the environment or
the file gets the same one-line error as a bad flag. `load(Family, namespace)` builds the frozen
value; commands read typed attributes from it, never an argparse Namespace.

    parser = argparse.ArgumentParser(); add_flags(parser, ServeSettings)
    s = load(ServeSettings, parser.parse_args(argv))      # ServeSettings(model=..., port=8000, ...)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpi_node.dtypes import DTYPE_NAMES, WIRE_NAMES
from tpi_node.errors import UserError
from tpi_node.units import parse_size

ENV_PREFIX = "TPI_"
DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_GRPC_PORT = 50051
DEFAULT_HTTP_PORT = 8000
DEFAULT_RUN_NODES = 3  # run's local cluster, at most one node per core (and at least 2)
# A node waiting to join is taken in at the next idle moment, or after this long even while requests
# run: their sequences are then replayed into the new plan's caches (one prefill each), which costs
# less than leaving a returning node out of a cluster whose traffic never stops (--admit-busy-after).
ADMIT_BUSY_AFTER_S = 15.0
FIRST_DIAL_S = 30.0  # join --dial-timeout's default


# ---- converters (argparse `type=`; they also convert values from the environment and YAML) ----
def _number(s: str, cast: Callable[[str], Any], noun: str):
    try:
        return cast(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{s}' is not {noun}") from None


def positive_int(s: str) -> int:
    v = _number(s, int, "a whole number")
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def non_negative_float(s: str) -> float:
    v = _number(s, float, "a number")
    if v < 0 or v != v:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def positive_float(s: str) -> float:
    v = non_negative_float(s)
    if v == 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {s}")
    return v


def unit_interval(s: str) -> float:
    v = non_negative_float(s)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {s}")
    return v


def token_split(s: str) -> str | int:
    """--token-split: auto, off, or the fewest tokens of a step that splits (a whole number)."""
    v = str(s).strip().lower()
    return v if v in ("auto", "off") else positive_int(v)


def port_number(s: str) -> int:
    v = _number(s, int, "a port number")
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535, got {v}")
    return v


def size(s: str) -> int:
    try:
        return parse_size(s)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ---- declaring a setting ---------------------------------------------------------------------
@dataclass(frozen=True)
class Flag:
    """How one setting appears on the command line, in the environment and in YAML."""

    help: str
    type: Callable[[str], Any] | None = None
    choices: tuple | None = None
    kind: str = "value"  # value | switch (store_true) | list (repeatable) | positional
    metavar: str | None = None
    flag: str | None = None  # default: --<name with dashes>
    env: str | None = None  # default: TPI_<NAME>
    required: bool = False


def setting(default: Any, help: str, **how) -> Any:
    """A dataclass field that is also a flag (see Flag for `how`)."""
    factory = list if how.get("kind") == "list" and default is None else None
    meta = {"flag": Flag(help, **how)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def flag_of(f: dataclasses.Field) -> Flag:
    return f.metadata["flag"]


def option_string(f: dataclasses.Field) -> str:
    return flag_of(f).flag or "--" + f.name.replace("_", "-")


def env_name(f: dataclasses.Field) -> str:
    return flag_of(f).env or ENV_PREFIX + f.name.upper()


# ---- option groups: each setting is declared in exactly one of them ---------------------------
@dataclass(frozen=True)
class ConfigFile:
    config: str | None = setting(
        None, "YAML file of settings (flags win, then TPI_* environment variables, then the file)", metavar="FILE"
    )


@dataclass(frozen=True)
class ModelOptions:
    model: str = setting(DEFAULT_MODEL, "a model name (prepared on first use) or a Hugging Face style directory")


QUANTS = ("none", "int8", "int4")  # --quant, model/quant.py


@dataclass(frozen=True)
class DtypeOption:
    dtype: str | None = setting(
        None,
        "dtype of the weights and the computation (default: fp32 on CPU, bf16 on CUDA sm_80+ and MPS; synth: fp32)",
        choices=DTYPE_NAMES,
    )
    quant: str = setting(
        "none",
        "weight-only quantisation of float weights: int8 (q8_0 blocks) or int4 (q4_1 blocks of 32); "
        "activations stay in --dtype; a GGUF's quantised tensors are always served as they are",
        choices=QUANTS,
    )


ACT_QUANTS = ("none", "int8")  # --act-quant, model/qkernel.py


@dataclass(frozen=True)
class ActQuantOption:
    act_quant: str = setting(
        "none",
        "int8: the quantised matmuls of small steps (decode) round each 32-value block of their input to "
        "int8 and multiply in integers (llama.cpp's way; AVX512-VNNI), faster but no longer fp32-exact "
        "against transformers (greedy text can differ after a few tokens); the master's choice holds on "
        "every node; a CPU without VNNI keeps the exact kernel and says so",
        choices=ACT_QUANTS,
    )


@dataclass(frozen=True)
class BudgetOptions:
    memory_budget: int | None = setting(
        None,
        "memory this node may use (e.g. 2GiB); layers stream through a window when the model does not fit",
        type=size,
        metavar="SIZE",
    )
    cache_size: int | None = setting(
        None,
        "disk this node's shard cache may use (e.g. 20GiB): the least recently used slice sets are removed "
        "first, never one a running process uses (default: unbounded; see `tpi-node cache`)",
        type=size,
        metavar="SIZE",
    )


@dataclass(frozen=True)
class KVOptions:
    kv_blocks: int | None = setting(
        None,
        "KV cache blocks (16 tokens each) on every node, instead of what --memory-budget leaves",
        type=positive_int,
        metavar="N",
    )
    max_context: int | None = setting(
        None,
        "the longest sequence served, in tokens (default: the model's context, or what the KV cache holds)",
        type=positive_int,
        metavar="TOKENS",
    )
    no_prefix_cache: bool = setting(
        False, "do not reuse the KV cache of a prompt prefix an earlier request computed", kind="switch"
    )


SPECULATIVE_MODES = ("auto", "off", "lookup", "draft")  # engine/speculative.py, engine/draft.py


@dataclass(frozen=True)
class DecodeOptions:
    speculative: str = setting(
        "auto",
        "speculative decoding: draft tokens that the cluster checks in one step - lookup: from the prompt and "
        "the text so far; draft: by --draft-model (auto: draft when --draft-model is given, else lookup; "
        "off: one token per step)",
        choices=SPECULATIVE_MODES,
    )
    draft_model: str | None = setting(
        None,
        "a draft model the master runs alone for speculative decoding: a model name, directory or .gguf with "
        "--model's tokenizer (a small model of its family, or --model itself with --draft-quant int4)",
        metavar="MODEL",
    )
    draft_quant: str = setting(
        "none",
        "weight-only quantisation of the draft model's float weights, as --quant does for --model",
        choices=QUANTS,
    )


FAST_PATH_MODES = ("auto", "off")  # commands/compose.py: choose_fast_path


@dataclass(frozen=True)
class FastPathOption:
    fast_path: str = setting(
        "auto",
        "the GPU fast path (auto: what detection allows - the fused add+RMSNorm kernel on one CUDA node, NCCL "
        "between GPUs of one NVLink domain; off: add+RMSNorm in torch, partial sums over the star or gloo)",
        choices=FAST_PATH_MODES,
    )


@dataclass(frozen=True)
class DeviceOptions:
    device: str = setting(
        "auto", "where this node computes: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps", metavar="DEVICE"
    )


@dataclass(frozen=True)
class TokenOption:
    token: str | None = setting(
        None, "cluster token (none = an open cluster; `tpi-node token` makes one)", env="TPI_CLUSTER_TOKEN"
    )


@dataclass(frozen=True)
class NodeOptions(TokenOption):
    node_id: str | None = setting(None, "this node's id (default: a stable id of this machine)")
    speed: float | None = setting(
        None, "this node's relative speed for the plan (default: measured)", type=non_negative_float
    )


@dataclass(frozen=True)
class TlsOptions:
    certs: str | None = setting(
        None,
        "mutual TLS from a `tpi-node certs` folder (ca.crt + master.crt/.key, or worker.crt/.key / --cert-name)",
        metavar="DIR",
    )
    tls_cert: str | None = setting(None, "this node's certificate (PEM)", metavar="FILE")
    tls_key: str | None = setting(None, "this node's private key (PEM)", metavar="FILE")
    tls_ca: str | None = setting(None, "the cluster CA certificate (PEM)", metavar="FILE")


@dataclass(frozen=True)
class ClusterNameOption:
    cluster: str = setting("default", "cluster name on the local network (mDNS) and in certificates", metavar="NAME")


@dataclass(frozen=True)
class ApiKeyOption:
    api_key: str | None = setting(
        None,
        "the API key: a master requires it as a bearer token on the OpenAI API, /metrics and /cluster.json "
        "(/health then tells only whether the cluster is up); status sends it",
    )


@dataclass(frozen=True)
class MasterOptions:
    host: str = setting("127.0.0.1", "HTTP address to listen on (default 127.0.0.1)")
    port: int = setting(
        DEFAULT_HTTP_PORT, f"HTTP port of the OpenAI API (default {DEFAULT_HTTP_PORT})", type=port_number
    )
    grpc_host: str | None = setting(None, "address workers dial (default: --host)")
    grpc_port: int | None = setting(
        None, f"gRPC port workers dial (default: serve {DEFAULT_GRPC_PORT}, run any free port)", type=port_number
    )
    wire: str = setting(
        "fp32",
        "format of the partial sums on the wire (default fp32; int8: blocks of 32 values with an fp16 scale, "
        "3.8x fewer bytes than fp32, summed in fp32 at the master; the star only)",
        choices=WIRE_NAMES,
    )
    collective: str = setting(
        "star",
        "what sums the partial sums: the gRPC star through the master (default), or a torch.distributed gloo "
        "ring (every node must reach the master's gloo port; no re-plan after a lost node)",
        choices=("star", "gloo"),
    )
    token_split: str | int = setting(
        "auto",
        "token split: steps of at least N tokens (long prefill chunks, big batches) run as two halves, one "
        "half's allreduce overlapping the other's compute (the star and NVLink groups; gloo never splits). "
        "auto: the threshold measured for the collective in use (the line said at start names it); off: never",
        type=token_split,
        metavar="auto|off|N",
    )
    head_split: str = setting(
        "auto",
        "split the lm_head by vocabulary rows across the nodes: each computes its rows' logits and sends the "
        "master only what sampling needs (one more gather per step). auto: with 2 or more nodes when the "
        "lm_head has at least 64M parameters; the gRPC star only (the line said at start tells)",
        choices=("auto", "on", "off"),
    )
    peer_timeout: float = setting(
        5.0, "seconds without a partial sum before a worker counts as lost (default 5)", type=non_negative_float
    )
    public_metrics: bool = setting(
        False, "serve /metrics without the API key (for a Prometheus scraper)", kind="switch"
    )
    admit_busy_after: float = setting(
        ADMIT_BUSY_AFTER_S,
        "seconds a returning or new worker waits while requests never stop; then the master re-plans with it "
        f"between two steps and replays the running sequences (default {ADMIT_BUSY_AFTER_S:g})",
        type=non_negative_float,
        metavar="S",
    )
    auto_admit: bool = setting(
        False, "admit new workers of this cluster at the next idle moment (re-planning)", kind="switch"
    )


@dataclass(frozen=True)
class MinNodesOption:
    min_nodes: int = setting(
        1, "nodes (this one included) to wait for before planning the split (default 1)", type=positive_int
    )


@dataclass(frozen=True)
class GpusOption:
    gpus: str | None = setting(
        None,
        "one node per GPU of this machine, this one on the first: all, or a list such as 0,1 (the others are "
        "`tpi-node join` children); they sum in one NVLink group where detection allows, else over the star",
        metavar="all|LIST",
    )


@dataclass(frozen=True)
class NodesOption:
    nodes: int | None = setting(
        None,
        f"local cluster size, master included (default: run {DEFAULT_RUN_NODES} or one per core if fewer, "
        "at least 2; generate 1)",
        type=positive_int,
    )


@dataclass(frozen=True)
class WorkerOptions:
    master: str | None = setting(
        None,
        f"the master's gRPC address (port default {DEFAULT_GRPC_PORT}; default: found on the local network by mDNS)",
        metavar="HOST[:PORT]",
    )
    expect_model: str = setting("", "refuse a master serving another model", metavar="DIGEST")
    discover_timeout: float = setting(
        5.0, "seconds to look for the master by mDNS when --master is not given (default 5)", type=non_negative_float
    )
    dial_timeout: float = setting(
        FIRST_DIAL_S,
        f"seconds a worker dials a master it has never reached before it gives up, saying why (a wrong "
        f"address, a firewall, another cluster's certificates) (default {FIRST_DIAL_S:g})",
        type=positive_float,
        metavar="S",
    )
    master_retry_s: float = setting(
        3600.0,
        "seconds a worker keeps looking for a master it lost (killed, restarting, unreachable; found again by "
        "mDNS when it was found that way) before it exits; 0: exit at once (default 3600)",
        type=non_negative_float,
        metavar="S",
    )
    cert_name: str | None = setting(None, "use NAME.crt/NAME.key from --certs (default: worker)", metavar="NAME")
    local_session: str = setting(
        "auto",
        "auto: a worker that reaches its master over loopback (the same machine) runs its session, the steps "
        "and partial sums, on the master's Unix socket instead of gRPC (~10x less time per hop); off: gRPC",
        choices=("auto", "off"),
    )


@dataclass(frozen=True)
class SeedOption:
    seed: int | None = setting(None, "random seed (generate: sampling; synth: the weights, default 0)", type=int)


@dataclass(frozen=True)
class PromptOptions:
    prompt: str = setting("", "the prompt", required=True)
    chat: bool = setting(False, "send the prompt as one user message through the chat template", kind="switch")
    max_tokens: int = setting(128, "tokens to generate at most (default 128)", type=positive_int)
    temperature: float = setting(0.0, "sampling temperature (default 0: greedy)", type=non_negative_float)
    top_p: float = setting(1.0, "nucleus sampling mass (default 1)", type=unit_interval)
    top_k: int = setting(0, "sample among the k most likely tokens (default 0: off)", type=int)


@dataclass(frozen=True)
class PrepareOptions:
    name: str = setting(DEFAULT_MODEL, "the model to prepare", kind="positional")


@dataclass(frozen=True)
class SynthOptions:
    preset: str = setting("", "the model shape to write (see model/presets.py)", required=True)
    layers: int | None = setting(None, "decoder layers (default: the preset's)", type=positive_int)


@dataclass(frozen=True)
class OutOption:
    out: str | None = setting(None, "output folder (certs default: $TPI_HOME/certs)")


@dataclass(frozen=True)
class StatusOptions:
    status_master: str | None = setting(
        None,
        "the master's HTTP address (default: found by mDNS, else http://127.0.0.1:8000), or grpc://HOST[:PORT] "
        "to ask its gRPC port (with the cluster token and TLS files when it has them)",
        flag="--master",
        metavar="URL",
    )
    json: bool = setting(False, "print the raw JSON state", kind="switch")


CACHE_ACTIONS = ("list", "prune")  # commands/cache.py


@dataclass(frozen=True)
class CacheOptions:
    action: str = setting("list", "list (default): the cached slice sets; prune: remove unused ones", kind="positional")
    keep: int | None = setting(
        None, "prune: remove least recently used unused sets until the cache fits in SIZE", type=size, metavar="SIZE"
    )
    prune_all: bool = setting(False, "prune: remove every set no running process uses", kind="switch", flag="--all")


@dataclass(frozen=True)
class CertsOptions:
    worker_certs: list[str] = setting(
        None,
        "a worker certificate to make (repeatable; default: one named 'worker')",
        kind="list",
        flag="--worker",
        metavar="NAME",
    )
    cert_hosts: list[str] = setting(
        None,
        "extra DNS name or IP to put in the certificates (repeatable)",
        kind="list",
        flag="--host",
        metavar="HOST",
    )


# ---- command families ---------------------------------------------------------------------------
@dataclass(frozen=True)
class MasterSettings(
    ModelOptions,
    DtypeOption,
    ActQuantOption,
    BudgetOptions,
    KVOptions,
    DecodeOptions,
    DeviceOptions,
    FastPathOption,
    NodeOptions,
    TlsOptions,
    ClusterNameOption,
    MasterOptions,
    ApiKeyOption,
    ConfigFile,
):
    """What starts a master (serve, run)."""


@dataclass(frozen=True)
class ServeSettings(MinNodesOption, GpusOption, MasterSettings):
    pass


@dataclass(frozen=True)
class RunSettings(NodesOption, MasterSettings):
    pass


@dataclass(frozen=True)
class JoinSettings(WorkerOptions, BudgetOptions, DeviceOptions, NodeOptions, TlsOptions, ClusterNameOption, ConfigFile):
    pass


@dataclass(frozen=True)
class GenerateSettings(
    ModelOptions,
    PromptOptions,
    SeedOption,
    DtypeOption,
    ActQuantOption,
    BudgetOptions,
    KVOptions,
    DecodeOptions,
    DeviceOptions,
    FastPathOption,
    NodesOption,
    ConfigFile,
):
    pass


@dataclass(frozen=True)
class PrepareSettings(PrepareOptions):
    pass


@dataclass(frozen=True)
class SynthSettings(SynthOptions, OutOption, DtypeOption, SeedOption):
    pass


@dataclass(frozen=True)
class StatusSettings(StatusOptions, ApiKeyOption, TokenOption, TlsOptions, ClusterNameOption):
    pass


@dataclass(frozen=True)
class TokenSettings:
    pass


@dataclass(frozen=True)
class CertsSettings(OutOption, CertsOptions, ClusterNameOption):
    pass


@dataclass(frozen=True)
class CacheSettings(CacheOptions):
    pass


# ---- flags and merging ---------------------------------------------------------------------------
def declared_fields(family: type) -> list[tuple[type, dataclasses.Field]]:
    """(declaring option group, field) of every setting of `family`, in the order of its bases."""
    fields, out = {f.name: f for f in dataclasses.fields(family)}, []
    for group in family.__mro__:
        for name in group.__dict__.get("__annotations__", {}):
            if name in fields and all(name != f.name for _, f in out):
                out.append((group, fields[name]))
    return out


def add_flags(parser: argparse.ArgumentParser, family: type) -> None:
    """Every setting of `family` as a flag. Defaults are suppressed so that the parsed namespace
    holds exactly what was given on the command line (load() fills in the rest)."""
    for _, f in declared_fields(family):
        how = flag_of(f)
        kw: dict[str, Any] = {"help": how.help, "default": argparse.SUPPRESS}
        if how.kind == "positional":
            parser.add_argument(f.name, nargs="?", **kw)
            continue
        if how.kind == "switch":
            kw["action"] = "store_true"
        else:
            kw.update(type=how.type, choices=how.choices, metavar=how.metavar)
            if how.kind == "list":
                kw["action"] = "append"
        parser.add_argument(option_string(f), dest=f.name, required=how.required, **kw)


def load(family: type, given: argparse.Namespace | Mapping[str, Any], environ: Mapping[str, str] | None = None):
    """The frozen settings of `family`: flags in `given`, else TPI_* in `environ`, else the
    --config file, else the default."""
    flags = dict(vars(given) if isinstance(given, argparse.Namespace) else given)
    environ = os.environ if environ is None else environ
    names = {f.name for f in dataclasses.fields(family)}
    cfg_path = (flags.get("config") or environ.get(ENV_PREFIX + "CONFIG")) if "config" in names else None
    file = load_yaml(cfg_path) if cfg_path else {}
    unknown = sorted(set(file) - names)
    if unknown:
        raise UserError(f"config file {cfg_path}: unknown setting(s) {', '.join(unknown)}")
    values = {}
    for f in dataclasses.fields(family):
        if f.name in flags:
            values[f.name] = flags[f.name]
        elif env_name(f) in environ:
            values[f.name] = convert(f, environ[env_name(f)], env_name(f))
        elif f.name in file:
            values[f.name] = convert(f, file[f.name], f"{cfg_path}: {f.name}")
    if "config" in names:
        values["config"] = cfg_path
    return family(**values)


def convert(f: dataclasses.Field, raw: Any, where: str) -> Any:
    """A value from the environment or the file, through the flag's own converter and choices."""
    how = flag_of(f)
    if how.kind == "switch":
        if isinstance(raw, bool):
            return raw
        s = str(raw).strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off", ""):
            return False
        raise UserError(f"{where}: '{raw}' is not a boolean (true/false)")
    if how.kind == "list":
        items = raw if isinstance(raw, list) else [x for x in str(raw).split(",") if x]
        return [_convert_one(how, x, where) for x in items]
    return _convert_one(how, raw, where)


def _convert_one(how: Flag, raw: Any, where: str) -> Any:
    try:
        value = how.type(str(raw)) if how.type else raw
    except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
        raise UserError(f"{where}: {e}") from None
    if how.choices is not None and value not in how.choices:
        raise UserError(f"{where}: '{raw}' is not one of {', '.join(map(str, how.choices))}")
    return value


def load_yaml(path: str | Path) -> dict:
    import yaml

    p = Path(path).expanduser()
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except OSError as e:
        raise UserError(f"cannot read config file {p}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping of settings")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def families() -> list[type]:
    """Every command family (the CLI test checks each flag is declared once across them)."""
    return [
        ServeSettings,
        RunSettings,
        JoinSettings,
        GenerateSettings,
        PrepareSettings,
        SynthSettings,
        StatusSettings,
        TokenSettings,
        CertsSettings,
        CacheSettings,
    ]
