"""
Measure how well our tokenizer compresses text (UTF-8 bytes per token, higher is better)
on a few kinds of text, and compare it with the GPT-2 and GPT-4 (cl100k_base) tokenizers.

The reference tokenizers come from tiktoken, which downloads them on first use. Offline
(and without a pre-filled TIKTOKEN_CACHE_DIR) a comparison is skipped with a message;
our own numbers are always reported.

Ours beside upstream's: our own sample texts; a missing train/val split, an unavailable
reference tokenizer and a missing tokenizer of ours are one line each; our own table of
ratios; colours only on a terminal.

Example:
python -m scripts.tok_eval
"""
import os
import sys
from nanochat.tokenizer import get_tokenizer, RustBPETokenizer
from nanochat.dataset import parquets_iter_batched

# Sample texts, one per kind of text we care about (written for this script)
news_text = r"""
(Lisbon, March 3, 2026) – Port authorities confirmed on Tuesday that the container ship “Marisol Azul” ran aground on a sandbank roughly 4.5 nautical miles west of the harbour entrance, shortly after 06:40 local time. None of the 23 crew members were injured, and early inspections found no sign of fuel leaking from the hull, officials said.

The vessel, which was carrying 1,870 containers from Rotterdam to Casablanca, is expected to be refloated at high tide on Thursday with the help of three tugboats. “Our first priority is the safety of the crew and of the coastline — everything else comes second,” said harbour master Inês Carvalho at a press briefing. Traffic in the main shipping lane was diverted for about six hours but has since resumed, with delays of up to 90 minutes reported by several operators.

The national maritime agency has opened an investigation into the incident. Preliminary data from the ship’s voyage recorder suggest that a steering fault may have played a role, although the agency cautioned that it was “far too early” to draw conclusions. Environmental groups welcomed the swift response but called for stricter limits on the size of vessels allowed to approach the estuary during winter storms.
""".strip()

korean_text = r"""
오늘의 날씨와 생활 정보
서울 생활 뉴스

이번 주말에는 전국 대부분 지역에 맑은 날씨가 이어지겠습니다. 다만 아침과 저녁의 기온 차이가 10도 이상 벌어질 것으로 보여 건강 관리에 각별한 주의가 필요합니다.

기상청은 토요일 오후부터 동해안 일부 지역에 약한 비가 내릴 수 있다고 밝혔습니다. 강수량은 많지 않겠지만, 산간 지역을 찾는 등산객은 ‘우산’과 따뜻한 겉옷을 챙기는 것이 좋겠습니다.

한편, 미세먼지 농도는 ‘보통’ 수준을 유지하겠으며, 일요일 밤부터는 북서풍이 불면서 공기가 한층 깨끗해질 전망입니다.
가을 단풍은 다음 주 중반에 설악산에서 절정을 맞을 것으로 예상됩니다.
**주말 나들이 계획이 있으시다면, 출발 전에 ‘교통 상황’과 ‘현지 날씨’를 꼭 확인하시기 바랍니다.**
""".strip()

code_text = r"""
from collections import Counter


def pair_counts(ids):
    # how often does each adjacent pair of token ids occur?
    return Counter(zip(ids, ids[1:]))


def apply_merge(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


class TinyBPE:

    def __init__(self):
        self.merges = {}  # (left id, right id) -> merged id
        self.vocab = {b: bytes([b]) for b in range(256)}

    def fit(self, text, vocab_size, verbose=False):
        if vocab_size < 256:
            raise ValueError("vocab_size must cover the 256 byte values")
        ids = list(text.encode("utf-8"))
        for new_id in range(256, vocab_size):
            counts = pair_counts(ids)
            if not counts:
                break
            best = max(counts, key=counts.get)
            ids = apply_merge(ids, best, new_id)
            self.merges[best] = new_id
            self.vocab[new_id] = self.vocab[best[0]] + self.vocab[best[1]]
            if verbose:
                print(f"merge {new_id - 255}: {best} -> {new_id} {self.vocab[new_id]!r} ({counts[best]} times)")
        return self
""".strip()

math_text = r"""
\documentclass[11pt]{article}
\usepackage{amsmath,amssymb,amsthm}
\usepackage[margin=1in]{geometry}

\newtheorem{proposition}{Proposition}
\newtheorem*{note}{Note}

\begin{document}

\section*{Odd Numbers Add Up to Squares}

\begin{proposition}
For every integer $n \geq 1$,
\[
\sum_{j=1}^{n} (2j - 1) \;=\; n^{2}.
\]
\end{proposition}

\begin{proof}[Proof by induction]
Write $T(n) = \sum_{j=1}^{n} (2j-1)$. For $n = 1$ we get $T(1) = 1 = 1^2$.
Suppose $T(n) = n^2$ for some $n \geq 1$. Then
\[
T(n+1) = T(n) + \bigl(2(n+1) - 1\bigr) = n^2 + 2n + 1 = (n+1)^2,
\]
so the statement holds for $n+1$ as well, and by induction for every $n \geq 1$.
\end{proof}

\begin{proof}[Proof by pairing]
Add the sum to itself in reverse order:
\[
2\,T(n) = \sum_{j=1}^{n} \bigl[(2j-1) + (2(n-j+1)-1)\bigr] = \sum_{j=1}^{n} 2n = 2n^2,
\]
hence $T(n) = n^2$. Equivalently, $\frac{1}{n}\sum_{j=1}^{n}(2j-1) = n$: the average odd number is $n$.
\end{proof}

\begin{note}
Picture an $n \times n$ grid of dots: peeling off the ``L''-shaped borders from the corner gives $1, 3, 5, \dots, 2n-1$ dots — the gnomons of the ancient Greeks.
\end{note}

\end{document}
""".strip()

science_text = r"""
Cellular respiration is the set of catabolic pathways by which cells oxidise glucose and other fuels to regenerate ATP, coupling exergonic redox chemistry to the phosphorylation of ADP. In eukaryotes, glycolysis in the cytosol splits each C₆H₁₂O₆ molecule into two pyruvates, yielding a net two ATP and two NADH; pyruvate is then imported into the mitochondrial matrix, where the pyruvate dehydrogenase complex decarboxylates it to acetyl-CoA, releasing CO₂. The citric acid (Krebs) cycle completes the oxidation of the acetyl group, reducing NAD⁺ and FAD to NADH and FADH₂, whose electrons flow through complexes I–IV of the inner-membrane electron transport chain to O₂, the terminal acceptor. The resulting proton gradient (Δp ≈ 180–200 mV) drives ATP synthase, a rotary motor that produces roughly 30–32 ATP per glucose under typical conditions, although the exact yield depends on shuttle systems, proton leak, and the cell’s metabolic state.
""".strip()


# ours: the first row group of a split, or "" with a note when the split is missing or empty
def first_batch_text(split):
    try:
        return "\n".join(next(parquets_iter_batched(split=split)))
    except StopIteration:
        print(f"Note: the {split} split holds no documents, skipping climbmix-{split}")
    except FileNotFoundError as e:
        print(f"Note: skipping climbmix-{split}: {e}")
    return ""

# The tokenizer was trained on the first shards, so it has seen the train text but not val
train_text = first_batch_text("train")
val_text = first_batch_text("val")

all_text = [
    ("news", news_text),
    ("korean", korean_text),
    ("code", code_text),
    ("math", math_text),
    ("science", science_text),
]
if train_text:
    all_text.append(("climbmix-train", train_text))
if val_text:
    all_text.append(("climbmix-val", val_text))

# ours: a reference tokenizer that cannot be loaded (tiktoken downloads them) is skipped
# with a note; our own missing is an error
def reference_tokenizer(label, tiktoken_name):
    try:
        return RustBPETokenizer.from_pretrained(tiktoken_name)
    except (RuntimeError, ValueError) as e:
        print(f"Note: {label} tokenizer unavailable, skipping that comparison: {e}")
        return None

def our_tokenizer():
    try:
        return get_tokenizer()
    except FileNotFoundError as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(1)

# Our tokenizer beside GPT-2's and GPT-4's
tokenizer_results = {}
vocab_sizes = {}

for tokenizer_name in ["gpt2", "gpt4", "ours"]:

    if tokenizer_name == "gpt2":
        tokenizer = reference_tokenizer("GPT-2", "gpt2")
    elif tokenizer_name == "gpt4":
        tokenizer = reference_tokenizer("GPT-4", "cl100k_base")
    else:
        tokenizer = our_tokenizer()
    if tokenizer is None:
        continue

    vocab_sizes[tokenizer_name] = tokenizer.get_vocab_size()
    tokenizer_results[tokenizer_name] = {}

    for name, text in all_text:
        encoded = tokenizer.encode(text)
        decoded = tokenizer.decode(encoded)
        assert decoded == text, f"{tokenizer_name} failed to round-trip the {name} text"

        encoded_bytes = text.encode('utf-8')
        ratio = len(encoded_bytes) / len(encoded)
        tokenizer_results[tokenizer_name][name] = {
            'bytes': len(encoded_bytes),
            'tokens': len(encoded),
            'ratio': ratio
        }

# ANSI colours, only on a terminal: speedrun.sh tees this into a log file (upstream always colours)
_COLOR = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
GREEN = '\033[92m' if _COLOR else ''
RED = '\033[91m' if _COLOR else ''
RESET = '\033[0m' if _COLOR else ''

print(f"\nVocab sizes:")
print(f"GPT-2: {vocab_sizes.get('gpt2', 'unavailable')}")
print(f"GPT-4: {vocab_sizes.get('gpt4', 'unavailable')}")
print(f"Ours: {vocab_sizes['ours']}")

# ours: our own ratios, printed even when no reference is available
print(f"\nOur tokenizer:")
print("=" * 40)
print(f"{'Text Type':<15} {'Bytes':<8} {'Tokens':<8} {'Ratio':<7}")
print("-" * 40)
for name, _ in all_text:
    r = tokenizer_results['ours'][name]
    print(f"{name:<15} {r['bytes']:<8} {r['tokens']:<8} {r['ratio']:<7.2f}")

def print_comparison(baseline_name, baseline_results, ours_results, all_text):
    """Table of token counts and ratios, baseline vs ours; the better ratio in green."""
    print(f"\nComparison with {baseline_name}:")
    print("=" * 95)
    print(f"{'Text Type':<10} {'Bytes':<8} {baseline_name:<15} {'Ours':<15} {'Relative':<12} {'Better':<10}")
    print(f"{'':10} {'':8} {'Tokens':<7} {'Ratio':<7} {'Tokens':<7} {'Ratio':<7} {'Diff %':<12}")
    print("-" * 95)

    for name, text in all_text:
        baseline_data = baseline_results[name]
        ours_data = ours_results[name]

        # positive = we need fewer tokens than the baseline for the same text
        relative_diff = ((baseline_data['tokens'] - ours_data['tokens']) / baseline_data['tokens']) * 100

        # the higher bytes/token ratio compresses better
        if baseline_data['ratio'] > ours_data['ratio']:
            baseline_color, ours_color = GREEN, RED
            better = baseline_name
            diff_color = RED
        elif ours_data['ratio'] > baseline_data['ratio']:
            baseline_color, ours_color = RED, GREEN
            better = "Ours"
            diff_color = GREEN
        else:
            baseline_color, ours_color = "", ""
            better = "Tie"
            diff_color = ""

        print(f"{name:<10} {baseline_data['bytes']:<8} "
              f"{baseline_color}{baseline_data['tokens']:<7}{RESET} "
              f"{baseline_color}{baseline_data['ratio']:<7.2f}{RESET} "
              f"{ours_color}{ours_data['tokens']:<7}{RESET} "
              f"{ours_color}{ours_data['ratio']:<7.2f}{RESET} "
              f"{diff_color}{relative_diff:+7.1f}%{RESET}     "
              f"{better:<10}")

if 'gpt2' in tokenizer_results:  # ours: only the references that loaded
    print_comparison("GPT-2", tokenizer_results['gpt2'], tokenizer_results['ours'], all_text)
if 'gpt4' in tokenizer_results:
    print_comparison("GPT-4", tokenizer_results['gpt4'], tokenizer_results['ours'], all_text)
