"""
HumanEval: 164 Python functions to complete, each graded by running its unit tests.
https://huggingface.co/datasets/openai/openai_humaneval
(Despite the name, no humans are involved: it is a coding benchmark.)
The generated program runs in the sandbox of nanochat.execution.
"""

import re
from nanochat.execution import execute_code
from tasks.common import Task, load_hub_dataset


def extract_imports(prompt):
    """The import lines at the top of a prompt (comments and blank lines skipped), joined by newlines."""
    imports = []
    for line in prompt.split('\n'):
        stripped = line.strip()
        if stripped.startswith('import ') or stripped.startswith('from '):
            imports.append(stripped)
        elif stripped and not stripped.startswith('#'):
            break # the first real code line ends the import header
    return '\n'.join(imports)


# a fenced block, ```python or bare ```, up to the first closing fence
CODE_BLOCK_RE = re.compile(r'```(?:python)?\s*\n(.*?)\n```', re.DOTALL)


def extract_program(completion):
    """
    The code inside a model's completion: the first ``` fenced block if there is one
    (so chatter before or after it is dropped), otherwise the whole completion.
    """
    blocks = CODE_BLOCK_RE.findall(completion)
    if blocks:
        return blocks[0].strip()
    return completion.strip()


class HumanEval(Task):

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # one split only; the hub's parquet export names its config "openai_humaneval"
        self.ds = load_hub_dataset("openai/openai_humaneval", subset="openai_humaneval", split="test").shuffle(seed=42)

    @property
    def eval_type(self):
        return 'generative'

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        """The prompt (imports, signature, docstring) as the user turn; prompt + solution as the answer."""
        row = self.ds[index]
        prompt = row['prompt']
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": f"{prompt}\n{row['canonical_solution']}"},
        ]
        return {
            "messages": messages,
            "entry_point": row['entry_point'], # name of the function under test
            "test": row['test'], # defines check(candidate)
        }

    def evaluate(self, conversation, completion):
        """True if the completion passes the problem's tests when run in the sandbox."""
        # models usually rewrite the whole function but often forget the prompt's imports,
        # so those are put back in front of the extracted code
        imports = extract_imports(conversation['messages'][0]['content'])
        program = (
            imports
            + "\n\n"
            + extract_program(completion)
            + "\n\n"
            + conversation['test']
            + "\n"
            + f"check({conversation['entry_point']})"
        )
        return execute_code(program).success
