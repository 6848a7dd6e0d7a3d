"""`tunevec serve`: one FastAPI application over one vLLM engine (see server/app.py)."""

from __future__ import annotations

import argparse


def configure_serve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", help="base model folder")
    parser.add_argument("--vectors", help="folder of tuning-vector artifacts")
    parser.add_argument(
        "--config", help="tunevec.yaml: any of the options below, plus `variants: {name: spec}`"
    )
    parser.add_argument("--host", help="default 127.0.0.1")
    parser.add_argument("--port", type=int, help="default 8000")
    parser.add_argument("--served-model-name", help="the base model's name in requests (default: base)")
    parser.add_argument(
        "--api-key", help="require this bearer token on every route but /health (or TUNEVEC_API_KEY)"
    )
    parser.add_argument("--inject", help="spec injected into the engine weights at load time (full speed)")
    parser.add_argument("--adapter-rank", type=int, help="LoRA rank per vector (default 16)")
    parser.add_argument(
        "--adapter-energy", type=float, help="instead of a rank: keep this share of ||tau||^2"
    )
    parser.add_argument("--max-lora-rank", type=int, help="engine's max LoRA rank (default 64)")
    parser.add_argument("--max-loras", type=int, help="distinct mixtures per batch (default 4)")
    parser.add_argument(
        "--allow-truncation",
        action="store_true",
        default=None,
        help="serve mixtures above --max-lora-rank by SVD re-truncation (error reported)",
    )
    parser.add_argument("--max-components", type=int, help="components per spec (default 4)")
    parser.add_argument("--max-abs-alpha", type=float, help="largest |alpha| accepted (default 4)")
    parser.add_argument("--max-model-len", type=int, help="longest prompt + completion in tokens")
    parser.add_argument("--cache-capacity", type=int, help="mixtures kept registered (default 32)")
    parser.add_argument("--dtype", help="engine dtype (default auto)")
    parser.add_argument(
        "--enforce-eager", action="store_true", default=None, help="no graph capture / compile"
    )
    parser.add_argument("--tensor-parallel-size", type=int, help="passes through to vLLM")
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER, help="after --: further vLLM engine arguments")
    parser.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import uvloop
    from tunevec.server.app import serve
    from tunevec.server.config import ServerConfig

    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "run", "command", "vllm_args")}
    overrides["vllm_args"] = [a for a in args.vllm_args if a != "--"] or None
    config = ServerConfig.load(args.config, overrides)
    uvloop.run(serve(config))
    return 0
