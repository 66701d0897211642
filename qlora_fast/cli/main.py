"""Entry point of the `qlora-fast` command."""

import argparse
import functools
import sys
from importlib import resources

from .config import ConfigError, ignored_keys_line, load_config, override_takes_next, parse_overrides


CONFIG_HELP = "YAML training config (axolotl-style keys; see qlora_fast/cli/config.py)"
OVERRIDES_EPILOG = ("Any config key may follow, as in axolotl, to replace the file's value for this run: "
                    "--key value or --key=value, e.g. --learning_rate 1e-4 --max_steps 100.")


def default_config_path() -> str:
    return str(resources.files("qlora_fast") / "configs" / "tiny.yaml")


def _parser():
    parser = argparse.ArgumentParser(prog="qlora-fast", description="Fast QLoRA fine-tuning (peft + bitsandbytes).",
                                     epilog=OVERRIDES_EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)
    # no abbreviated options: a config key given as an override (--out...) must not pass for one
    command = functools.partial(sub.add_parser, allow_abbrev=False, epilog=OVERRIDES_EPILOG)
    train = command("train", help="fine-tune with a YAML config (default: the tiny embedded one)")
    train.add_argument("config", nargs="?", default=None, help=CONFIG_HELP + " (default: the tiny embedded one)")
    compare = command("compare", help="same steps on stock peft and on qlora_fast: losses, speed, memory")
    compare.add_argument("config", nargs="?", default=None, help=CONFIG_HELP + " (default: the tiny embedded one)")
    compare.add_argument("--steps", type=int, default=8, help="training steps each run takes (default: 8)")
    compare.add_argument("--out", default=None, help="report folder (default: <output_dir>/compare)")
    compare.add_argument("--timing-rounds", type=int, default=5,
                         help="stock/patched steps timed alternately after the parity run (0: time the parity run)")
    check = command("verify", help="before a long run: do the patched layers compute what stock peft does "
                                          "on this model and data? per-matrix gradients, fused calls, verdict")
    check.add_argument("config", nargs="?", default=None, help=CONFIG_HELP + " (default: the tiny embedded one)")
    check.add_argument("--steps", type=int, default=2, help="batches whose losses are compared (default: 2)")
    merge = command("merge", help="merge a trained adapter into the dequantized base model")
    merge.add_argument("config", help=CONFIG_HELP + ": the base model the adapter was trained on")
    merge.add_argument("--adapter", default=None, help="adapter folder (default: the config's output_dir)")
    merge.add_argument("--out", required=True, help="folder for the merged model and its tokenizer")
    generate = command("generate", help="generate from a prompt with the trained adapter")
    generate.add_argument("config", help=CONFIG_HELP + ": the base model the adapter was trained on")
    generate.add_argument("--prompt", required=True, help="user message (wrapped in the chat template if any)")
    generate.add_argument("--adapter", default=None, help="adapter folder (default: the config's output_dir)")
    generate.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default: 32)")
    return parser


def _split_overrides(parser, argv: list[str]) -> tuple[list[str], list[str]]:
    """(the command line without its config overrides, the overrides): each --name that is not an option of
    the command, with the value after it unless written --name=value. Taken out before argparse, which would
    read an override's value as the config file where none is given (`train --max_steps 5`)."""
    commands = parser._subparsers._group_actions[0].choices
    command = commands.get(argv[0]) if argv else None
    if command is None:
        return argv, []
    options = {option for action in command._actions for option in action.option_strings}
    kept, overrides, i = argv[:1], [], 1
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and arg.split("=")[0] not in options:
            takes_next = override_takes_next(argv, i)
            overrides += argv[i:i + 1 + takes_next]
            i += 1 + takes_next
        else:
            kept.append(arg)
            i += 1
    return kept, overrides


def run(argv=None) -> int:
    parser = _parser()
    argv, overrides = _split_overrides(parser, sys.argv[1:] if argv is None else list(argv))
    args, stray = parser.parse_known_args(argv)
    try:
        cfg = load_config(getattr(args, "config", None) or default_config_path(), parse_overrides(stray + overrides))
        ignored = ignored_keys_line(cfg)
        if ignored:
            print(f"qlora-fast: {ignored}", file=sys.stderr, flush=True)
        if args.command == "train":
            from .train import train

            train(cfg)
        elif args.command == "compare":
            from .check import compare_config

            if not compare_config(cfg, args.steps, args.out, args.timing_rounds).passed:
                return 1
        elif args.command == "verify":
            from .check import verify_config

            if not verify_config(cfg, args.steps).passed:
                return 1
        elif args.command == "merge":
            from .merge import merge

            print(f"merged model saved to {merge(cfg, args.adapter, args.out)}")
        else:
            from .merge import generate

            print(generate(cfg, args.prompt, args.adapter, args.max_new_tokens))
    except ConfigError as exc:
        print(f"qlora-fast: config error: {exc}", file=sys.stderr)
        return 2
    return 0


def main():
    sys.exit(run())


if __name__ == "__main__":
    main()
