"""
SmolTalk from HuggingFace: general multi-turn chat, the bulk of nanochat's SFT mixture.
https://huggingface.co/datasets/HuggingFaceTB/smol-smoltalk
We use the "smol" edition, which suits small models better than the full one.
"""

from tasks.common import Task, load_hub_dataset


class SmolTalk(Task):
    """smol-smoltalk: about 460K train and 24K test conversations."""

    def __init__(self, split, **kwargs):
        super().__init__(**kwargs)
        assert split in ["train", "test"], "SmolTalk split must be train|test"
        self.ds = load_hub_dataset("HuggingFaceTB/smol-smoltalk", split=split).shuffle(seed=42)
        self.length = len(self.ds)

    def num_examples(self):
        return self.length

    def get_example(self, index):
        messages = self.ds[index]["messages"]
        # The tokenizer's renderer relies on this shape, so fail here, at the row, rather
        # than deep inside training: an optional leading system message, then at least
        # one user/assistant exchange, strictly alternating, all plain strings.
        assert len(messages) >= 1
        dialogue = messages[1:] if messages[0]["role"] == "system" else messages
        assert len(dialogue) >= 2, "SmolTalk messages must have at least 2 messages"
        for i, message in enumerate(dialogue):
            expected_role = "user" if i % 2 == 0 else "assistant"
            assert message["role"] == expected_role, f"Message {i} has role {message['role']} but should be {expected_role}"
            assert isinstance(message["content"], str), "Content must be a string"
        # the system message stays in: render_conversation folds it into the first user turn
        return {"messages": messages}
