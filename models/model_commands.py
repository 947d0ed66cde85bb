"""The captioner's commands: ``medcap caption``, ``model``, ``train``, ``evaluate``, ``data``.

Registered into the ``medcap`` parser by ``service/cli.py``; handlers take ``(settings, args)``
and read only ``settings.model`` (the default checkpoint), so this module stays free of
service code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from models.families import REGISTRY, compose_flags

LOG = logging.getLogger("medcap.models")


class ModelCommandError(Exception):
    pass


def _friendly(handler: Any) -> Any:
    """User mistakes (a missing checkpoint, a bad config, unreadable data) end as one clear
    line, not a traceback; programming errors still raise."""

    def run(settings: Any, args: argparse.Namespace) -> int:
        try:
            from models.checkpoint import CheckpointError
            from models.config import ConfigError
            from models.sources import ComposeError
            from models.weights import WeightsError
        except ImportError as exc:
            raise ModelCommandError(f"the captioner needs the model extra ({exc.name} is missing): pip install -e '.[model]'") from exc

        try:
            return int(handler(settings, args) or 0)
        except (CheckpointError, ComposeError, ConfigError, WeightsError, FileNotFoundError, FileExistsError, ValueError) as exc:
            raise ModelCommandError(str(exc)) from exc

    return run


def register(sub: Any) -> None:
    p = sub.add_parser("caption", help="caption a DICOM file or folder offline and print a draft per series")
    p.add_argument("path", type=Path)
    _model_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _generation_args(p)
    p.add_argument("--key-slices", type=int, default=3, help="key slices per series (default 3)")
    p.add_argument("--key-strategy", default="uniform", choices=["central", "uniform", "content"])
    p.add_argument("--window", default=None, help="CT window preset (brain, subdural, stroke, bone, soft_tissue, lung, auto)")
    p.add_argument(
        "--no-grounding",
        dest="grounding",
        action="store_false",
        help="print the model's text as it is: no heading from the header facts, no sentence removed (docs/header-facts.md)",
    )
    _threads_arg(p)
    p.set_defaults(func=_friendly(cmd_caption))

    model = sub.add_parser("model", help="build and inspect captioner checkpoints")
    msub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    p = msub.add_parser("compose", help="build a checkpoint of any captioner from pretrained parts (hub ids or local directories)")
    p.add_argument("--model-type", default="msmedcap", choices=list(REGISTRY))
    p.add_argument("--out", type=Path, required=True)
    _compose_args(p)
    p.add_argument("--name", default="")
    _threads_arg(p)
    p.set_defaults(func=_friendly(cmd_compose))
    p = msub.add_parser(
        "import-lavis", help="msmedcap family: a checkpoint from the authors' LAVIS .pth files (key-coverage report in IMPORT_REPORT.md)"
    )
    p.add_argument("checkpoints", type=Path, nargs="+", metavar="CHECKPOINT.pth", help="LAVIS checkpoint(s); later files win")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--blip2", required=True, help="BLIP-2 (HF format) for the frozen EVA ViT and OPT, and the OPT tokenizer")
    p.add_argument("--sam", help="msmedcap, sam_blip2: the frozen SAM encoder (hub id, directory or .pth)")
    p.add_argument("--bert", default="bert-base-uncased", help="the Q-Former tokenizer (and any text side the files lack)")
    p.add_argument("--model-type", default="msmedcap", choices=["msmedcap", "blip2", "sam_blip2"])
    p.add_argument("--sam-layout", default="channel", choices=["channel", "spatial"], help="the official code: channel")
    p.add_argument("--eval-image-size", type=int, help="CLIP view when captioning (default 364 for a 224 px ViT, as the paper)")
    p.add_argument(
        "--keep-text-side",
        action="store_true",
        help="write a training checkpoint (with the Q-Former text side, fp32) instead of an inference one",
    )
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="inference checkpoint: frozen parts' dtype")
    p.add_argument("--name", default="")
    _threads_arg(p)
    p.set_defaults(func=_friendly(cmd_import_lavis))
    p = msub.add_parser("export", help="msmedcap family: an inference checkpoint (frozen parts in bf16, no Q-Former text side, sharded)")
    _model_arg(p)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="frozen encoders and LM (default bf16; Q-Formers stay fp32)"
    )
    p.add_argument("--shard-gb", type=float, default=2.0, help="largest weights file, in GiB (default 2)")
    p.set_defaults(func=_friendly(cmd_export))
    p = msub.add_parser("demo", help="train the tiny demo MSMedCap on synthetic slices (CPU, a few minutes)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    _threads_arg(p)
    p.set_defaults(func=_friendly(cmd_demo))
    p = msub.add_parser("info", help="print a checkpoint's model card")
    _model_arg(p)
    p.set_defaults(func=_friendly(cmd_info))

    train = sub.add_parser("train", help="train a captioner (stage 1: one Q-Former; stage 2: the LM loss)")
    tsub = train.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage in ("stage1", "stage2"):
        p = tsub.add_parser(stage, help="ITC + ITM + ITG for one Q-Former" if stage == "stage1" else "LM loss through the frozen OPT")
        if stage == "stage1":
            p.add_argument("--qformer", required=True, choices=["clip", "sam"])
        _model_arg(p)
        _data_args(p)
        p.add_argument("--mix", help="data mix for this Q-Former: G, M or G+M (paper: CLIP G, SAM G+M); default: all given data")
        p.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
        defaults = (
            "stage 1: 3 epochs, batch 8, lr 1e-4 -> 1e-5, 5000 warm-up steps from 1e-6"
            if stage == "stage1"
            else "stage 2: 5 epochs, batch 8, lr 1e-4 -> 1e-5, 2000 warm-up steps from 1e-6"
        )
        p.add_argument("--epochs", type=int, help=f"defaults follow the paper and LAVIS ({defaults}; weight decay 0.05)")
        p.add_argument("--max-steps", type=int)
        p.add_argument("--batch-size", type=int)
        p.add_argument("--lr", type=float)
        p.add_argument("--min-lr", type=float)
        p.add_argument("--warmup-steps", type=int)
        p.add_argument("--warmup-lr", type=float, help="learning rate the warm-up starts from")
        p.add_argument("--weight-decay", type=float, help="AdamW weight decay on weight matrices (biases, norms, temperature exempt)")
        p.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: only at the end)")
        p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
        p.add_argument(
            "--feature-cache",
            default="memory",
            choices=["memory", "disk"],
            help="frozen-encoder features in RAM, or fp16 memory-mapped on disk beside --out (large datasets)",
        )
        p.add_argument("--device", default="auto")
        p.add_argument("--seed", type=int, default=0)
        _threads_arg(p)
        p.set_defaults(func=_friendly(cmd_train))
    p = tsub.add_parser(
        "caption",
        help="train any captioner on its caption loss, early stopping on validation loss "
        "(MSMedCap family: stage 2); defaults are each model's paper recipe",
    )
    _model_arg(p)
    _data_args(p)
    p.add_argument("--out", type=Path, required=True, help="output checkpoint directory (the best epoch's weights)")
    p.add_argument("--validation-split", default="validation", help="split for early stopping (default validation)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--min-lr", type=float, help="cosine decay to this rate over the run (default: constant after warm-up)")
    p.add_argument("--optimizer", choices=["adam", "adamw"])
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float, help="max gradient norm (0: no clipping)")
    p.add_argument("--patience", type=int, help="epochs without a better validation loss before stopping (0: never stop early)")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out at its next epoch")
    p.add_argument("--feature-cache", default="memory", choices=["memory", "disk"])
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    _threads_arg(p)
    p.set_defaults(func=_friendly(cmd_train_caption))

    p = sub.add_parser(
        "evaluate",
        help="score captioners side by side (BLEU-1..4, METEOR, ROUGE-L, CIDEr) and count sentences contradicting the DICOM header",
    )
    p.add_argument("--model", type=Path, action="append", required=True, help="checkpoint directory; repeat for several")
    _data_args(p, required=False)
    p.add_argument(
        "--dicom",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="DICOM file or folder: draft each CT/MR series and report the contradiction rate with and without grounding; repeatable",
    )
    p.add_argument("--key-slices", type=int, default=3, help="with --dicom: key slices per series (default 3)")
    p.add_argument("--key-strategy", default="uniform", choices=["central", "uniform", "content"])
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, help="score at most this many images")
    p.add_argument("--out", type=Path, help="write results.md and results.json here")
    p.add_argument("--detail-words", choices=["synthetic"], help="also score the synthetic benchmark's detail words")
    p.add_argument("--bertscore-model", type=Path, help="local model directory for BERTScore (optional)")
    p.add_argument("--bleurt-model", type=Path, help="local checkpoint directory for BLEURT (optional)")
    p.add_argument(
        "--candidates", default="", help="for captioners that rerank (SBG): comma-separated candidate counts, one row each, e.g. 1,2,5"
    )
    _generation_args(p)
    _threads_arg(p)
    p.set_defaults(func=_friendly(cmd_evaluate))

    data = sub.add_parser("data", help="datasets")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = dsub.add_parser("synthetic", help="write the synthetic CT/MR benchmark (PNG + captions.jsonl)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--validation", type=int, default=200)
    p.add_argument("--test", type=int, default=300)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_friendly(cmd_synthetic))


def _compose_args(p: argparse.ArgumentParser) -> None:
    """The flags every registered family reads (models/families.py), each once; its help names the families."""
    for option, readers in compose_flags().values():
        by_help: dict[str, list[str]] = {}
        for model_type in readers:
            own = next(o for o in REGISTRY[model_type].compose if o.name == option.name)
            by_help.setdefault(own.help, []).append(model_type)
        text = "; ".join(f"{', '.join(types)}: {help_text}" for help_text, types in by_help.items())
        kwargs: dict[str, Any] = {"default": option.default, "help": text}
        if option.choices:
            kwargs["choices"] = list(option.choices)
        if option.kind is int:
            kwargs["type"] = int
        if option.repeat:
            kwargs["action"] = "append"
        if option.data:
            kwargs["metavar"] = "SPEC"
        p.add_argument(option.flag, dest=option.name, **kwargs)


def _threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads", type=int, help="torch CPU threads (default: MEDCAP_TORCH_THREADS; 0 or unset: torch's default, one per core)"
    )


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="checkpoint directory (default: MEDCAP_MODEL)")


def _generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="fast", choices=["fast", "paper"])
    p.add_argument("--beams", type=int, help="override the preset's beam count (fast: 1, or 3)")
    p.add_argument("--batch-size", type=int, default=8, dest="gen_batch_size")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--seed", type=int, default=0)


def _data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--data",
        action="append",
        required=required,
        metavar="[GROUP=]SPEC",
        help="table.csv|table.jsonl, roco:DIR, medicat:DIR, flickr:DIR (Flickr8k/30k) or coco:ANNOTATIONS.json:IMAGES_DIR; "
        "prefix G= (general) or M= (medical) for mixes; repeatable",
    )


def _prepare(settings: Any, args: argparse.Namespace) -> None:
    """Before any torch work: quiet transformers, and pin torch's CPU threads (``--threads``, else
    MEDCAP_TORCH_THREADS; 0 keeps torch's default of one per core). On small shared machines
    few threads are much faster: `train caption` ran about 15x faster on 1 thread than on
    torch's default on our 2 shared cores."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    threads = getattr(args, "threads", None) or int(getattr(settings, "torch_threads", 0) or 0)
    if threads:
        torch.set_num_threads(threads)
    LOG.info(
        "torch uses %d CPU thread(s)%s",
        torch.get_num_threads(),
        "" if threads else " (its default; --threads or MEDCAP_TORCH_THREADS to pin)",
    )


def _model_dir(settings: Any, args: argparse.Namespace) -> Path:
    directory = args.model or getattr(settings, "model", None)
    if directory is None:
        raise ModelCommandError(
            "no model: pass --model DIR or set MEDCAP_MODEL (make one with `medcap model compose` or `medcap model demo`)"
        )
    if not Path(directory).is_dir():
        raise ModelCommandError(f"model directory {directory} does not exist")
    return Path(directory)


def _candidates(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ModelCommandError(f"--candidates {text}: expected comma-separated whole numbers, e.g. 1,2,5") from None
    if any(v < 1 for v in values):
        raise ModelCommandError(f"--candidates {text}: counts must be at least 1")
    return values


def _generation(args: argparse.Namespace) -> Any:
    from models.generation import preset

    chosen = preset(args.preset)
    return chosen.with_beams(args.beams) if args.beams else chosen


# -- data specs ------------------------------------------------------------------------------


def load_data(specs: list[str]) -> dict[str, dict[str, list[Any]]]:
    """``[GROUP=]SPEC`` arguments → {"G"|"M": {name: records}}; ungrouped data counts as G."""
    from models import datasets as ds

    groups: dict[str, dict[str, list[Any]]] = {}
    for raw in specs:
        group, sep, spec = raw.partition("=")
        if not sep:
            group, spec = "G", raw
        group = group.upper()
        if group not in ("G", "M"):
            raise ModelCommandError(f"--data {raw}: group must be G or M")
        kind, _, rest = spec.partition(":")
        if kind == "roco":
            records, name = ds.read_roco(Path(rest)), f"roco:{rest}"
        elif kind == "medicat":
            records, name = ds.read_medicat(Path(rest)), f"medicat:{rest}"
        elif kind == "flickr":
            records, name = ds.read_flickr(Path(rest)), f"flickr:{rest}"
        elif kind == "coco":
            annotations, _, images = rest.partition(":")
            if not images:
                raise ModelCommandError(f"--data {raw}: coco needs ANNOTATIONS.json:IMAGES_DIR")
            records, name = ds.read_coco_captions(Path(annotations), Path(images), split="train"), f"coco:{annotations}"
        else:
            path = Path(spec)
            if not path.is_file():
                raise ModelCommandError(f"--data {raw}: {path} does not exist")
            records, name = ds.read_table(path), str(path)
        groups.setdefault(group, {})[name] = records
    return groups


def select_records(groups: dict[str, dict[str, list[Any]]], split: str, mix: str | None) -> list[Any]:
    from models.datasets import build_mix

    spec = mix or "+".join(g for g in ("G", "M") if g in groups)
    records = build_mix(spec, groups, split=split)
    if not records:
        raise ModelCommandError(f"no {split} records in the given data for mix {spec}")
    return records


# -- commands ----------------------------------------------------------------------------------


def cmd_caption(settings: Any, args: argparse.Namespace) -> int:
    _prepare(settings, args)
    from dicom_io.key_slices import KeySliceSpec
    from dicom_io.model_input import prepare_series
    from models.captioner import Captioner, summarise

    if not args.path.exists():
        raise ModelCommandError(f"{args.path} does not exist")
    captioner = Captioner.load(_model_dir(settings, args), args.device)
    series = prepare_series(
        args.path, views=captioner.views, key_slices=KeySliceSpec(strategy=args.key_strategy, n=args.key_slices), window=args.window
    )
    if not series:
        raise ModelCommandError(f"no CT or MR image series under {args.path}")
    from dicom_io.header_facts import series_facts
    from models.grounding import ground, prompt_for

    drafts: list[dict[str, Any]] = []
    for item in series:
        facts = series_facts(item.series)
        # a model that takes a prompt (hf-vlm) reads the series' key images together with its header facts
        (captions,) = captioner.caption_series(
            [(dict(item.views), prompt_for(facts))], _generation(args), batch_size=args.gen_batch_size, seed=args.seed
        )
        grounded = ground(captions, facts)
        drafts.append(
            {
                "series_uid": item.series_uid,
                "study_uid": item.study_uid,
                "modality": item.modality,
                "header_facts": facts.as_dict(),
                "draft": grounded.text if args.grounding else summarise(captions),
                "model_draft": summarise(captions),  # before grounding: every sentence as the model wrote it
                "removed": [r.as_dict() for r in grounded.removed] if args.grounding else [],
                "key_images": [{"sop_instance_uid": uid, "caption": c} for uid, c in zip(item.sop_instance_uids, captions, strict=True)],
            }
        )
    if args.json:
        print(
            json.dumps(
                {
                    "model": captioner.describe(),
                    "status": "PRELIMINARY, UNVERIFIED AI draft",
                    "grounding": args.grounding,
                    "series": drafts,
                },
                indent=2,
            )
        )
        return 0
    print(
        f"AI draft — preliminary, unverified ({captioner.identity.name} {captioner.identity.version}, "
        f"weights {captioner.identity.weights_sha256[:12]})"
    )
    for d in drafts:
        print(f"\nseries {d['series_uid']} ({d['modality']}, {len(d['key_images'])} key images)\n  {d['draft']}")
        for removal in d["removed"]:
            print(f"  removed (contradicts the header): {removal['sentence']!r}: {'; '.join(removal['reasons'])}")
    return 0


def cmd_compose(settings: Any, args: argparse.Namespace) -> int:
    """Whatever the family's registration declares: its required flags are checked here, a flag of
    another family is refused, and the family's own ``compose`` builds the checkpoint."""
    _prepare(settings, args)
    from models.families import ComposeRequest, family

    kind = args.model_type
    declared = {o.name: o for o in REGISTRY[kind].compose}
    missing = [o.flag for o in declared.values() if o.required and not getattr(args, o.name)]
    if missing:
        raise ModelCommandError(f"model compose --model-type {kind} needs {' and '.join(missing)}")
    foreign = [o.flag for name, (o, _) in compose_flags().items() if name not in declared and getattr(args, name) not in (None, o.default)]
    if foreign:
        raise ModelCommandError(f"model compose --model-type {kind} does not read {', '.join(foreign)}")
    compose = family(kind).compose
    if compose is None:
        raise ModelCommandError(f"model compose: {kind} cannot be composed from pretrained parts")
    specs = [spec for o in declared.values() if o.data for spec in getattr(args, o.name) or []]
    captions = [r.caption for r in select_records(load_data(specs), "train", None)] if specs else []
    options = {name: getattr(args, name) for name in declared}
    compose(ComposeRequest(kind, args.out, options, captions, args.name, lambda m: print(m, file=sys.stderr)))
    print(f"wrote {args.out}; train it with: medcap train caption --model {args.out} --data SPEC --out DIR")
    return 0


def cmd_import_lavis(settings: Any, args: argparse.Namespace) -> int:
    _prepare(settings, args)
    from models.msmedcap.lavis import import_lavis
    from models.weights import parse_dtype

    if args.model_type != "blip2" and not args.sam:
        raise ModelCommandError(f"model import-lavis --model-type {args.model_type} needs --sam (the frozen SAM encoder)")
    sha, coverage = import_lavis(
        args.checkpoints,
        out=args.out,
        blip2=args.blip2,
        sam=args.sam,
        model_type=args.model_type,
        bert=args.bert,
        sam_layout=args.sam_layout,
        eval_image_size=args.eval_image_size,
        keep_text_side=args.keep_text_side,
        dtype=parse_dtype(args.dtype),
        name=args.name,
        log=lambda m: print(m, file=sys.stderr),
    )
    print(
        f"wrote {args.out} (weights sha256 {sha}): {len(coverage.by_target)} weights from the LAVIS file(s), "
        f"{len(coverage.unused)} entries read by nothing on purpose; see {args.out / 'IMPORT_REPORT.md'}"
    )
    return 0


def cmd_export(settings: Any, args: argparse.Namespace) -> int:
    _prepare(settings, args)
    from models.msmedcap.inference import export
    from models.weights import parse_dtype

    if args.shard_gb <= 0:
        raise ModelCommandError("--shard-gb: must be positive")
    source = _model_dir(settings, args)
    sha = export(
        source, args.out, dtype=parse_dtype(args.dtype), shard_bytes=int(args.shard_gb * 1024**3), log=lambda m: print(m, file=sys.stderr)
    )
    print(f"wrote {args.out} (weights sha256 {sha}); use it with MEDCAP_MODEL={args.out}")
    return 0


def cmd_info(settings: Any, args: argparse.Namespace) -> int:
    card = _model_dir(settings, args) / "MODEL_CARD.md"
    if not card.is_file():
        raise ModelCommandError(f"{card} is missing: not a MedCap checkpoint")
    print(card.read_text(), end="")
    return 0


def cmd_demo(settings: Any, args: argparse.Namespace) -> int:
    _prepare(settings, args)
    from models.demo import build_demo_model

    build_demo_model(args.out, steps=args.steps, seed=args.seed)
    print(f"demo model written to {args.out}; try: medcap caption ../shared/data/ct-head-ge --model {args.out}")
    return 0


def cmd_train(settings: Any, args: argparse.Namespace) -> int:
    _prepare(settings, args)
    from models import checkpoint
    from models.generation import default_dtype, select_device
    from models.msmedcap.training import TrainSettings, train

    source = args.out if args.resume else _model_dir(settings, args)
    device = select_device(args.device)  # frozen parts in bf16 (fp16 on older GPUs) on CUDA, fp32 on CPU
    model, tokenizers, provenance = checkpoint.load(source, device, default_dtype(device))
    records = select_records(load_data(args.data), "train", args.mix)
    train_settings = TrainSettings.for_stage(
        args.stage,
        branch=getattr(args, "qformer", None),
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        min_lr=args.min_lr,
        warmup_steps=args.warmup_steps,
        warmup_lr=args.warmup_lr,
        weight_decay=args.weight_decay,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        feature_cache=args.feature_cache,
    )
    history = provenance.get("history", [])
    if args.resume and history and not history[-1].get("final", True):
        history = history[:-1]
    prov = checkpoint.Provenance(
        provenance.get("sources", []),
        provenance.get("initialised", []),
        history + [{"data": args.data, "mix": args.mix or "all", "records": len(records)}],
    )
    result = train(model, tokenizers, records, train_settings, args.out, prov, resume=args.resume)
    print(f"{args.stage}: {result.steps} steps, last loss {result.losses[-1]['loss']:.4f}; checkpoint {args.out}")
    return 0


def cmd_train_caption(settings: Any, args: argparse.Namespace) -> int:
    _prepare(settings, args)
    from models import checkpoint
    from models.fitting import FitSettings, fit
    from models.generation import default_dtype, select_device

    source = args.out if args.resume else _model_dir(settings, args)
    device = select_device(args.device)  # frozen parts in bf16 (fp16 on older GPUs) on CUDA, fp32 on CPU
    model, text, provenance = checkpoint.load(source, device, default_dtype(device))
    groups = load_data(args.data)
    records = select_records(groups, "train", None)
    validation = [r for g in groups.values() for rs in g.values() for r in rs if r.split == args.validation_split]
    fit_settings = FitSettings.for_model(
        model.config.model_type,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        min_lr=args.min_lr,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip or None,
        patience=args.patience or None,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        feature_cache=args.feature_cache,
    )
    disabled: dict[str, Any] = {}
    if args.grad_clip == 0:
        disabled["grad_clip"] = None
    if args.patience == 0 or (args.patience is None and not validation):
        disabled["patience"] = None  # an explicit --patience without validation data is refused by fit, with the reason
    if disabled:
        fit_settings = dataclasses.replace(fit_settings, **disabled)
    if not validation:
        print(f"note: no {args.validation_split} records: no early stopping, the last epoch is kept", file=sys.stderr)
    history = provenance.get("history", [])
    if args.resume and history and not history[-1].get("final", True):
        history = history[:-1]
    prov = checkpoint.Provenance(
        provenance.get("sources", []),
        provenance.get("initialised", []),
        history + [{"data": args.data, "records": len(records), "validation_records": len(validation)}],
    )
    result = fit(model, text, records, fit_settings, args.out, prov, validation_records=validation, resume=args.resume)
    best = f", best epoch {result.best_epoch}" if result.best_epoch else ""
    stopped = " (stopped early)" if result.stopped_early else ""
    print(f"{model.config.display_name}: {result.steps} steps, {result.epochs} epochs{stopped}{best}; checkpoint {args.out}")
    return 0


def cmd_evaluate(settings: Any, args: argparse.Namespace) -> int:
    _prepare(settings, args)
    from models.evaluation import evaluate_checkpoints

    if not args.data and not args.dicom:
        raise ModelCommandError("give --data SPEC (captioned images) and/or --dicom PATH (DICOM series)")
    for path in args.dicom:
        if not path.exists():
            raise ModelCommandError(f"{path} does not exist")
    if args.dicom:
        from dicom_io.key_slices import KeySliceSpec
        from models.evaluation import evaluate_dicom

        grounding = evaluate_dicom(
            args.model,
            args.dicom,
            generation=_generation(args),
            device=args.device,
            batch_size=args.gen_batch_size,
            key_slices=KeySliceSpec(strategy=args.key_strategy, n=args.key_slices),
            out_dir=args.out,
        )
        print(grounding.table())
    if not args.data:
        return 0
    records = select_records(load_data(args.data), args.split, None)
    if args.limit:
        records = records[: args.limit]
    report = evaluate_checkpoints(
        args.model,
        records,
        generation=_generation(args),
        device=args.device,
        batch_size=args.gen_batch_size,
        out_dir=args.out,
        detail_words=args.detail_words,
        bertscore_model=args.bertscore_model,
        bleurt_model=args.bleurt_model,
        candidates=_candidates(args.candidates),
    )
    print(report.table())
    for note in report.notes:
        print(f"note: {note}")
    return 0


def cmd_synthetic(settings: Any, args: argparse.Namespace) -> int:
    from models.synthetic import generate_dataset

    path = generate_dataset(args.out, n_train=args.train, n_val=args.validation, n_test=args.test, size=args.size, seed=args.seed)
    print(f"wrote {path}")
    return 0
