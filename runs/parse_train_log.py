"""
Pull the figures of one base_train log into a CSV row (used by miniseries.sh and scaling_laws.sh).

    python runs/parse_train_log.py LOG FIELD [FIELD ...]

Fields: params_<name> for each line of the parameter-count table (params_total, params_wte,
params_value_embeds, params_lm_head, params_transformer_matrices, params_scalars),
num_iterations, total_batch_size, tokens_trained, val_bpb, core_score. A figure missing from
the log prints as an empty cell.
"""
import re
import sys


def parse(text):
    out = {}
    for name, value in re.findall(r"^(\w+)\s+: ([\d,]+)$", text, flags=re.M):
        out[f"params_{name}"] = value.replace(",", "")
    m = re.findall(r"number of iterations.*?: ([\d,]+)", text)
    if m:
        out["num_iterations"] = m[-1].replace(",", "")
    m = re.findall(r"Total batch size ([\d,]+)", text)
    if m:
        out["total_batch_size"] = m[-1].replace(",", "")
    if "num_iterations" in out and "total_batch_size" in out:
        out["tokens_trained"] = str(int(out["num_iterations"]) * int(out["total_batch_size"]))
    m = re.findall(r"Validation bpb: ([\d.]+)", text)
    if m:
        out["val_bpb"] = m[-1]
    m = re.findall(r"CORE metric: ([\d.\-]+)", text)
    if m:
        out["core_score"] = m[-1]
    return out


if __name__ == "__main__":
    figures = parse(open(sys.argv[1]).read())
    print(",".join(figures.get(field, "") for field in sys.argv[2:]))
