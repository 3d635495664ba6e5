"""
Chat with a trained model in the terminal, on one device.

    python -m scripts.chat_cli                                  # the latest SFT model
    python -m scripts.chat_cli -i base -g d12 -p "The capital of France is"
    python -m scripts.chat_cli -i rl -t 0.0                     # greedy

Upstream's flags. The runtime behind them (streaming, 'clear'/'quit', the policy for
conversations longer than the model's context) is nanochat/chat.py, which also takes YAML
configs and variants: python -m nanochat.chat --config configs/chat_cpu.yaml.
With -p the reply alone goes to stdout, so `answer=$(python -m scripts.chat_cli -p ...)` works.
"""
import argparse

from nanochat import chat


def build_parser():
    parser = argparse.ArgumentParser(description="Chat with the model")
    parser.add_argument("-i", "--source", type=str, default="sft", help="Source of the model: sft|rl")
    parser.add_argument("-g", "--model-tag", type=str, default=None, help="Model tag to load")
    parser.add_argument("-s", "--step", type=int, default=None, help="Step to load")
    parser.add_argument("-p", "--prompt", type=str, default="", help="Prompt the model, get a single response back")
    parser.add_argument("-t", "--temperature", type=float, default=0.6, help="Temperature for generation")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="Top-k sampling parameter")
    parser.add_argument("--device-type", type=str, default="", choices=["cuda", "cpu", "mps"], help="Device type for evaluation: cuda|cpu|mps. empty => autodetect")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    settings = dict(chat.DEFAULTS, source=args.source, model_tag=args.model_tag, step=args.step,
                    prompt=args.prompt, temperature=args.temperature, top_k=args.top_k,
                    device_type=args.device_type)
    return chat.run_cli(settings)


if __name__ == "__main__":
    main()
