"""Paired A/B of quantization and eval settings on one trained model: no seed noise.

    SAVE_PREQUANT=1 torchrun --standalone --nproc_per_node=1 train_gpt.py   # writes final_model.pt
    python tools/ab.py --checkpoint final_model.pt --variant base: \\
        --variant nolqer:LQER_ENABLED=0 --variant ttt_off:TTT_ENABLED=0 [--json ab.json]
    torchrun --standalone --nproc_per_node=8 tools/ab.py --checkpoint ...  # the same on 8 GPUs

The model is rebuilt from the checkpoint's resolved config (SAVE_PREQUANT saves it with the
weights and the loop state); a checkpoint without one (older runs) takes the config from the env.
Each `--variant NAME:KEY=VAL[,KEY=VAL...]` (a VAL may hold commas: TTT_LORA_TARGETS=k,o,mlp,head)
overrides env names of the quantization and evaluation sections of `Hyperparameters` (plus
VAL_BATCH_TOKENS); the first variant is the base. Training-side
and architecture names are refused: the checkpoint fixes them (compare those by seeds at equal
wall-clock, `tools/seeds.py stats --against`). The process env may set the same names for every
variant, and DATA_PATH / TOKENIZER_PATH / ARTIFACT_DIR when the data lies elsewhere here.

Every variant runs what the trainer runs after training, with the same functions: GPTQ Hessians
from training data (shared by variants with the same calibration), quantize_fit (fitting to the
cap against the packed train_gpt.py, or --code-bytes), serialize, write (ab_NAME.ptz beside the
checkpoint), load_artifact, final_evaluation. A variant whose quantization settings equal an
earlier one's scores that variant's artifact (GPTQ is deterministic given the settings; its
`quantized_as` names it), so eval-only variants cost only their eval. After every variant it
prints the table (variant, val_bpb, delta vs the base, seconds of the scoring pass, of the eval
warmup and of the whole variant; Hessians are counted in the first variant that needs them, and
on a GPU the warmup of the first variant, or of one with new shapes, compiles the eval graphs) and
rewrites the JSON, so a job cut short keeps its rows.

    python tools/ab.py --artifact final_model.ptz --variant base: --variant notilt:NGRAM_BOOST=0

scores eval-only variants on a saved artifact instead (quantization variants need the float
weights, --checkpoint): its configuration is read as EVAL_ONLY reads it, and no Hessians,
GPTQ or training data are needed beyond what the data spec checks. A 16 MB artifact can come back
from a device call and travel to the next one, so eval levers of later sessions are paired on the
same model without training it again.
"""
import argparse
import dataclasses
import inspect
import json
import os
import re
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402

FIELDS = {f.name.upper(): f for f in dataclasses.fields(tg.Hyperparameters)}
MACHINE = {"data_path", "tokenizer_path", "artifact_dir", "run_id", "attn_backend"}  # env only: this machine
NOT_EVAL_SIDE = {"save_prequant", "eval_only", "prequant_ttt_epochs", "prequant_ttt_lr"}


def field_sections() -> dict:
    """Field name -> first word of the `# section` comment above it in Hyperparameters."""
    section, out = "", {}
    for line in inspect.getsource(tg.Hyperparameters).splitlines():
        if m := re.match(r"    # (\w+)", line):
            section = m.group(1)
        elif m := re.match(r"    (\w+): \w+ = ", line):
            out[m.group(1)] = section
    return out


EVAL_SIDE = {n for n, s in field_sections().items() if s in ("quantization", "evaluation")}
EVAL_SIDE = (EVAL_SIDE - NOT_EVAL_SIDE) | {"val_batch_tokens"}
QUANT_SIDE = sorted(n for n, s in field_sections().items() if s == "quantization" and n != "save_prequant")


def parse_overrides(env: dict, strict: bool) -> dict:
    """Declared env names -> typed values. Names the trainer would refuse (typos, renamed flags)
    raise its message; other names are ignored unless strict (a variant names only ours)."""
    out = {}
    for key, raw in env.items():
        if key in FIELDS:
            out[FIELDS[key].name] = tg.parse_env_value(raw, FIELDS[key].type, key)
            continue
        tg.load_config({key: raw})  # raises for a name that looks like ours
        if strict:
            raise ValueError(f"{key} is not an env name of train_gpt.py (`python train_gpt.py --help`)")
    return out


def parse_variant(spec: str) -> tuple:
    name, sep, body = spec.partition(":")
    if not sep or not name:
        raise ValueError(f"--variant {spec!r}: use NAME:KEY=VAL[,KEY=VAL...] (NAME: for no change)")
    # a comma starts a new KEY= only where one follows: TTT_LORA_TARGETS=k,o,mlp,head stays whole
    pairs = [p for p in re.split(r"[,\s]+(?=[A-Za-z_][A-Za-z0-9_]*=)|\s+", body) if p]
    if any("=" not in p for p in pairs):
        raise ValueError(f"--variant {spec!r}: each override is KEY=VAL")
    over = parse_overrides(dict(p.split("=", 1) for p in pairs), strict=True)
    fixed = sorted(k.upper() for k in over if k not in EVAL_SIDE)
    if fixed:
        raise ValueError(f"--variant {name}: {', '.join(fixed)} is fixed by the checkpoint (training "
                         "side, architecture or paths); compare it by seeds at equal wall-clock")
    return name, over


def base_config(ck: dict, environ) -> tg.Hyperparameters:
    """The checkpoint's resolved config with the env's eval-side and path names on top; an env
    name that would change a training-side value is refused. No config saved: the env's."""
    if "config" not in ck:
        return tg.load_config(environ)
    cfg, known = dict(ck["config"]), {f.name for f in dataclasses.fields(tg.Hyperparameters)}
    if set(cfg) - known:
        raise ValueError(f"checkpoint config has fields this train_gpt.py lacks: {sorted(set(cfg) - known)}")
    env = parse_overrides(dict(environ), strict=False)
    fixed = sorted(k.upper() for k, v in env.items()
                   if k not in EVAL_SIDE | MACHINE and v != cfg.get(k, FIELDS[k.upper()].default))
    if fixed:
        raise ValueError(f"env {', '.join(fixed)} differs from the checkpoint's config, which fixes it; unset it")
    return tg.Hyperparameters(**{**cfg, **env})


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"--checkpoint {path}: no such file (write one with SAVE_PREQUANT=1)")
    ck = torch.load(path, map_location="cpu")
    return ck if "state_dict" in ck else dict(state_dict=ck)  # older runs saved the weights only


def packed_code_bytes() -> int:
    """Size of the counted file a record run launches (tools/pack.py of train_gpt.py)."""
    import pack

    return len(pack.pack_bytes(pack.read_source(tg.__file__), "train_gpt.py"))


def artifact_config(path: str, environ) -> tg.Hyperparameters:
    """--artifact: the configuration the artifact carries with the env's eval names on top,
    exactly as an EVAL_ONLY run resolves it (a model name that disagrees is refused)."""
    if not os.path.isfile(path):
        raise ValueError(f"--artifact {path}: no such file")
    return tg.eval_only_config(tg.load_config({**environ, "EVAL_ONLY": path}))[1]


def quant_key(h: tg.Hyperparameters) -> tuple:
    return tuple(getattr(h, n) for n in QUANT_SIDE)


class Bench:
    """Shared state of one A/B: data, weights (or the artifact), Hessians per calibration setting."""

    def __init__(self, h: tg.Hyperparameters, ck: dict, code_bytes: int, workdir: str, artifact: str = ""):
        self.spec, self.d = tg.load_data_spec(h), tg.init_distributed(h)
        self.val, self.backend = tg.load_val_data(self.spec, h), tg.pick_attention_backend(self.d.device, h.attn_backend)
        self.sd = {k: v.float() for k, v in ck.get("state_dict", {}).items()}
        self.looping = ck.get("looping", h.num_loops > 0)  # older runs: a full run ends looping
        self.budget, self.workdir, self.hessians = tg.ARTIFACT_CAP - code_bytes, workdir, {}
        # quantization settings -> (variant that wrote it, path, model bytes, MLP sigma used); a given
        # artifact holds the base's settings, which no variant may change (main refuses them)
        self.artifacts = {quant_key(h): ("artifact", artifact, os.path.getsize(artifact), None)} if artifact else {}

    def log(self, tag: str):
        return lambda msg="", console=True: print(f"[{tag}] {msg}", flush=True) if self.d.is_main else None

    def hessians_for(self, h: tg.Hyperparameters) -> dict:
        key = (h.gptq_calibration_batches, h.attn_backend)
        if key not in self.hessians:
            model = tg.GPT(h, self.spec.bos_id, self.backend).to(self.d.device)
            model.load_state_dict({k: v.to(self.d.device) for k, v in self.sd.items()})
            model.looping = self.looping
            self.hessians[key] = tg.collect_hessians(model, self.spec, h, self.d)
        return self.hessians[key]

    def run(self, name: str, h: tg.Hyperparameters) -> dict:
        """Quantize, write, reload and score as main() does after training."""
        t0, log, timer = time.perf_counter(), self.log(name), tg.Timer(self.d.device)
        torch.manual_seed(h.seed)
        np.random.seed(h.seed)
        qkey = quant_key(h)  # eval-only variants reuse the artifact
        if qkey not in self.artifacts:
            blob, sigma = tg.quantize_fit(self.sd, self.hessians_for(h), h, self.budget, lambda *a, **k: None,
                                          timer, tg.artifact_meta(h, self.spec.identity))  # as the trainer writes it
            path = os.path.join(self.workdir, f"ab_{name}.ptz")
            if self.d.is_main:
                with open(path, "wb") as f:
                    f.write(blob)
            self.artifacts[qkey] = (name, path, len(blob), sigma)
        quantized_as, path, model_bytes, sigma = self.artifacts[qkey]
        if dist.is_initialized():
            dist.barrier()
        timer.restart(h.eval_budget_seconds)  # the strict eval starts at the load, as in main()
        with timer.phase("load"):
            model = tg.load_artifact(path, h, self.d, self.spec.bos_id, self.backend)
            model.looping = self.looping
        out = tg.final_evaluation(model, self.val, h, self.d, log, timer)
        return dict(variant=name, val_bpb=out["val_bpb"], val_loss=out["val_loss"], scored_by=out["scored_by"],
                    val_bpb_diagnostic=out["val_bpb_diagnostic"], model_bytes=model_bytes, quantized_as=quantized_as,
                    mlp_clip_sigmas_used=sigma, legality=out["legality"], eval_time_s=out["eval_time_s"],
                    warmup_s=out["timings"]["eval_warmup"], strict_s=out["eval_strict_s"],
                    seconds=time.perf_counter() - t0)


def table(rows: list) -> str:
    base = rows[0]
    # scoring: the scoring pass alone; warmup: compiling/running the eval graphs after the load (a
    # trainer run compiles them before training); seconds: the whole variant, quantization included
    lines = [f"{'variant':<16} {'val_bpb':>10} {'delta':>10} {'model_bytes':>12} {'scoring':>8} {'warmup':>7} "
             f"{'seconds':>8}  legality"]
    for r in rows:
        r["delta"] = r["val_bpb"] - base["val_bpb"]
        lines.append(f"{r['variant']:<16} {r['val_bpb']:>10.6f} {r['delta']:>+10.6f} {r['model_bytes']:>12} "
                     f"{r['eval_time_s']:>8.1f} {r['warmup_s']:>7.1f} {r['seconds']:>8.1f}  {r['legality']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="final_model.pt written with SAVE_PREQUANT=1")
    src.add_argument("--artifact", help="a saved final_model.ptz: eval-only variants, no requantization")
    ap.add_argument("--variant", action="append", default=[], help="NAME:KEY=VAL[,KEY=VAL...]; first = base")
    ap.add_argument("--json", default="ab.json", help="where the rows go (rank 0)")
    ap.add_argument("--code-bytes", type=int, default=None, help="code size for fitting to the cap "
                    "(default: the packed train_gpt.py)")
    args = ap.parse_args(argv)
    try:
        variants = [parse_variant(v) for v in args.variant or ["base:"]]
        if len({n for n, _ in variants}) < len(variants):
            raise ValueError("variant names must be unique")
        quant = sorted({k.upper() for _, over in variants for k in over if k in QUANT_SIDE})
        if args.artifact and quant:
            raise ValueError(f"--artifact: {', '.join(quant)} changes the quantization, which needs the "
                             "float weights (--checkpoint)")
        ck = {} if args.artifact else load_checkpoint(args.checkpoint)
        h = artifact_config(args.artifact, os.environ) if args.artifact else base_config(ck, os.environ)
        configs = [(n, dataclasses.replace(h, **over)) for n, over in variants]  # values checked here
    except ValueError as e:
        print(f"ab.py: {e}", file=sys.stderr)
        return 2
    source = os.path.abspath(args.artifact or args.checkpoint)
    bench = Bench(h, ck, args.code_bytes or packed_code_bytes(), os.path.dirname(source), args.artifact or "")
    rows = []
    for n, hv in configs:
        rows.append(bench.run(n, hv))
        if bench.d.is_main:
            print(table(rows), flush=True)
            with open(args.json, "w") as f:
                json.dump(dict(checkpoint=source, config_hash=h.config_hash(),
                               variants={n: {k.upper(): v for k, v in o.items()} for n, o in variants},
                               rows=rows), f, indent=1)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
