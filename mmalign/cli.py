"""`mmalign` command line: train, sample, score, serve-reward, methods."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

from mmalign.config import ConfigError, load_config, method_of, parse_override
from mmalign.config_help import help_text
from mmalign.errors import UserInputError
from mmalign.io import expand_files
from mmalign.registry import DATASETS, EVALUATORS, METHODS, REWARDS

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
PICKLE_HELP = "also read pickled (.bin) weights, with torch.load(weights_only=True); default: safetensors only"


def _train_help(args: argparse.Namespace) -> str:
    """`mmalign train --help [METHOD]` or `mmalign train CONFIG [overrides] --help`: the options that run reads."""
    if args.config is None:
        return help_text()
    if args.config in METHODS:
        method = args.config
    else:
        method = method_of(args.config, args.overrides)
        if method not in METHODS:
            raise ConfigError(f"unknown method {method!r}; `mmalign methods` lists them")
    return f"options of a {method} run (key = default):\n" + help_text(method)


def _train(args: argparse.Namespace) -> int:
    import mmalign

    if args.help or args.config is None:
        print(args.usage_text + "\n\nconfig keys (key = default):\n" + _train_help(args))
        return 0
    config = load_config(args.config, args.overrides)
    report = mmalign.train(config)
    if report:
        print(
            f"{report['gold_metric']}: {report['before']:.4f} -> {report['after']:.4f} "
            f"({report['delta']:+.4f}); report: {Path(config.output_dir) / 'report.md'}"
        )
    return 0


def _reward_kwargs(pairs: list[str]) -> dict:
    """`--reward-arg KEY=VALUE` pairs → keyword arguments, values read as YAML (`8` an int, `true` a bool)."""
    kwargs = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--reward-arg {pair!r} must look like key=value")
        key, value = parse_override(pair)
        kwargs[key] = value
    return kwargs


def _read_prompts(args: argparse.Namespace, n: int) -> list[str] | str | None:
    if args.prompts_file:
        prompts = [line.rstrip("\n") for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        if len(prompts) != n:
            raise ConfigError(f"{args.prompts_file}: {len(prompts)} prompts for {n} files; give one per file")
        return prompts
    return args.prompt


def _score(args: argparse.Namespace) -> int:
    import mmalign

    pickle = {"allow_pickle": True} if args.allow_pickle else {}
    reward = mmalign.load_reward(args.reward, **_reward_kwargs(args.reward_arg), **pickle)
    # a reward that reads other files than images (meshes) names them
    suffixes, kind = getattr(reward, "file_suffixes", IMAGE_SUFFIXES), getattr(reward, "file_kind", "image")
    files = expand_files(args.files, suffixes, kind)
    prompts = _read_prompts(args, len(files))
    scores = reward(files, prompts).tolist()
    per_file = prompts if isinstance(prompts, list) else [prompts] * len(files)
    rows = [{"file": f, "prompt": p, "score": s} for f, p, s in zip(files, per_file, scores)]
    width = max(len(r["file"]) for r in rows)
    print(f"{'file':<{width}}  {args.reward}")
    for r in rows:
        print(f"{r['file']:<{width}}  {r['score']:.4f}")
    if args.csv:
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=["file", "prompt", "score"])
        writer.writeheader()
        writer.writerows(rows)
        _write_output(args.csv, table.getvalue())
    if args.json:
        _write_output(args.json, json.dumps({"reward": args.reward, "scores": rows}, indent=2))
    return 0


def _write_output(path: str, text: str) -> None:
    """Write `text` to `path`; an error that names no file (a full disk) is raised naming `path`."""
    try:
        with open(path, "w", newline="") as f:
            f.write(text)
    except OSError as exc:
        if exc.filename:
            raise
        raise OSError(exc.errno, exc.strerror, path) from None


def _sample(args: argparse.Namespace) -> int:
    from PIL import Image

    import mmalign
    from mmalign.best_of_n import best_of_n, sample_candidates
    from mmalign.models.diffusion import DiffusionModel
    from mmalign.models.lora import load_lora
    from mmalign.train.grids import image_grid

    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("give at least one --prompt or a --prompts-file")
    model = DiffusionModel.from_pretrained(args.model, lora_rank=None, reference=False, allow_pickle=args.allow_pickle)
    if args.lora:
        load_lora(model.pipe, args.lora, allow_pickle=args.allow_pickle)
    options = dict(num_steps=args.steps, guidance_scale=args.guidance, seed=args.seed, batch_size=args.batch_size)
    out = Path(args.out)
    if out.is_dir() and any(out.glob("[0-9][0-9][0-9][0-9][0-9].png")):
        raise ConfigError(f"--out {out} holds the images of an earlier sample; choose another folder or empty it")
    all_prompts = [p for p in prompts for _ in range(args.num)]
    if args.best_of is not None:
        if args.best_of < 2:
            raise ConfigError(f"--best-of needs N ≥ 2 candidates per prompt, got {args.best_of}")
        reward = mmalign.load_reward(args.reward, **_reward_kwargs(args.reward_arg))
        result = best_of_n(model, all_prompts, args.best_of, reward, **options)
        images_t = result.images
        scores = [
            {"prompt": p, "chosen": int(c), "scores": s.tolist()}
            for p, c, s in zip(all_prompts, result.chosen, result.scores)
        ]
    else:
        images_t = sample_candidates(model, prompts, args.num, **options).flatten(0, 1)
        scores = None
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images_t):
        array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(array).save(out / f"{i:05d}.png")
    (out / "prompts.txt").write_text("\n".join(all_prompts) + "\n")
    if scores is not None:
        (out / "best_of_n.json").write_text(json.dumps({"reward": args.reward, "n": args.best_of, "samples": scores}))
    image_grid(images_t[:64], all_prompts[:64]).save(out / "grid.png")
    print(f"wrote {len(images_t)} images and grid.png to {out}")
    return 0


def _serve_reward(args: argparse.Namespace) -> int:
    import mmalign
    from mmalign.rewards.server import serve

    kwargs = _reward_kwargs(args.reward_arg)
    if args.path is not None:
        kwargs["path"] = args.path
    if args.device is not None:
        kwargs["device"] = args.device
    if args.allow_pickle:
        kwargs["allow_pickle"] = True
    reward = mmalign.load_reward(args.reward, **kwargs)
    route = args.route or (args.reward if args.reward in REWARDS else reward.name)
    if "/" in route or not route:
        raise UserInputError(f"route {route!r}: give --route NAME (no slashes) to serve this reward under")
    print(f"serving {reward.name} at http://{args.host}:{args.port}/{route}", flush=True)
    serve(reward, route, args.host, args.port, args.max_batch, args.max_wait_ms, args.log_level, args.max_request_mb)
    return 0


def _methods(args: argparse.Namespace) -> int:
    tables = (
        ("methods (mmalign train, `method:` key)", METHODS),
        ("rewards (mmalign score --reward, mmalign.load_reward)", REWARDS),
        ("evaluators (held-out evaluation of a run)", EVALUATORS),
    )
    width = max(len(name) for _, table in tables for name in table)
    for title, table in tables:
        print(f"{title}:")
        for name, (_, description) in table.items():
            print(f"  {name:<{width}} {description}")
        print()
    print("data (the data.path a method reads; embedded:<name> sets are built offline):")
    for name, (methods, description) in DATASETS.items():
        print(f"  {name:<24} {methods}\n  {'':<24} {description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmalign",
        description="Align generative models with preferences and "
        "rewards. Run `mmalign <command> --help` for each command's options.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="run a training recipe",
        add_help=False,  # --help lists the options of the run the config selects (`_train_help`)
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train from a recipe YAML. Override any key as key=value (dotted for nested keys; "
        "`model=ID` and `data=PATH` set model.path / data.path). A run killed mid-way resumes "
        "from its last checkpoint when the same command is run again. `mmalign train CONFIG --help` "
        "or `mmalign train --help METHOD` lists every option that run reads.",
    )
    train.add_argument("-h", "--help", action="store_true", help="list the options of this run (or METHOD)")
    train.add_argument(
        "config", nargs="?", help="recipe YAML, e.g. configs/image/diffusion_dpo.yaml, or a method name after --help"
    )
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    train.set_defaults(func=_train, usage_text=train.format_help())

    score = sub.add_parser("score", help="score images (or meshes, with a mesh reward) and print a table")
    score.add_argument("files", nargs="+", help="image or mesh files, or folders (searched recursively)")
    score.add_argument("--reward", default="clip-score", help="registered reward name or a trained reward folder")
    score.add_argument("--prompt", help="one prompt for every file")
    score.add_argument("--prompts-file", help="text file with one prompt per file, in order")
    score.add_argument(
        "--reward-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keyword argument for the reward (e.g. path=/models/clip), repeatable",
    )
    score.add_argument("--allow-pickle", action="store_true", help=f"the reward's model: {PICKLE_HELP}")
    score.add_argument("--csv", help="also write the table as CSV here")
    score.add_argument("--json", help="also write the scores as JSON here")
    score.set_defaults(func=_score)

    sample = sub.add_parser("sample", help="generate images from a diffusion model")
    sample.add_argument("--model", default="embedded:shapes-t2i", help="Hub id, diffusers folder or embedded:<name>")
    sample.add_argument("--lora", help="a LoRA folder written by a run (run_dir/final/lora)")
    sample.add_argument("--allow-pickle", action="store_true", help=f"--model and --lora: {PICKLE_HELP}")
    sample.add_argument("--prompt", action="append", help="prompt (repeatable)")
    sample.add_argument("--prompts-file", help="text file with one prompt per line")
    sample.add_argument("--num", type=int, default=1, help="images per prompt")
    sample.add_argument("--steps", type=int, default=20, help="sampling steps")
    sample.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    sample.add_argument("--seed", type=int, default=0, help="noise seed")
    sample.add_argument("--batch-size", type=int, default=32, help="images generated at once")
    sample.add_argument("--out", default="samples", help="output folder (PNGs, prompts.txt, grid.png)")
    sample.add_argument("--best-of", type=int, metavar="N", help="draw N candidates per image, keep the reward's best")
    sample.add_argument("--reward", default="clip-score", help="--best-of's reward: a name or a trained reward folder")
    sample.add_argument(
        "--reward-arg", action="append", default=[], metavar="KEY=VALUE", help="keyword argument for the reward"
    )
    sample.set_defaults(func=_sample)

    serve = sub.add_parser(
        "serve-reward",
        help="serve a reward over HTTP (batching concurrent requests)",
        description='Serve an image, video or mesh reward at http://HOST:PORT/ROUTE: POST {"kind": "image", '
        '"images": [base64 PNG, ...], "prompts": [...]} (or "video" with "videos", "mesh" with "meshes"; '
        "docs/rewards.md) returns {\"scores\": [...]}; load_reward('http://HOST:PORT/ROUTE') scores through it. "
        "Concurrent requests are gathered up to --max-batch items or --max-wait-ms and scored in one call.",
    )
    serve.add_argument("reward", help="registered reward name, trained reward folder or {reward: weight} mapping")
    serve.add_argument("--path", help="the reward's model folder (same as --reward-arg path=...)")
    serve.add_argument(
        "--reward-arg", action="append", default=[], metavar="KEY=VALUE", help="keyword argument for the reward"
    )
    serve.add_argument("--device", help="where the reward runs (e.g. cuda); default the reward's own")
    serve.add_argument("--allow-pickle", action="store_true", help=f"the reward's model: {PICKLE_HELP}")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8300, help="port to listen on")
    serve.add_argument("--route", help="URL path to serve at; default the reward's name")
    serve.add_argument(
        "--max-batch", type=int, default=64, help="items (images, clips or meshes) gathered into one reward call"
    )
    serve.add_argument("--max-wait-ms", type=float, default=5.0, help="longest wait for more requests to batch")
    serve.add_argument(
        "--max-request-mb", type=float, default=128.0, help="largest request body in MiB (larger ones get 413)"
    )
    serve.add_argument("--log-level", default="info", help="uvicorn log level (warning: no per-request lines)")
    serve.set_defaults(func=_serve_reward)

    methods = sub.add_parser("methods", help="list training methods and rewards")
    methods.set_defaults(func=_methods)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserInputError, KeyError, OSError) as exc:
        if isinstance(exc, KeyError) and exc.args:
            message = exc.args[0]
        elif isinstance(exc, OSError) and exc.filename:
            message = f"{exc.filename}: {exc.strerror or exc}"
        else:
            message = str(exc)
        message = " ".join(str(message).split())  # one line, whatever the library's message looked like
        print(f"mmalign {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
