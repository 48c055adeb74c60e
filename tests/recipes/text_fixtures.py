"""A tiny WikiText written in the raw release's on-disk format, and a tokenizer trained on it
locally with the `tokenizers` library."""

from pathlib import Path

# The raw release's conventions: every line starts with a space and ends with " \n",
# a blank line is " \n", headings are " = Title = " and " = = Section = = ", numbers and
# hyphens are split as " @,@ " and " @-@ ", and the file opens with a blank line.
_ARTICLES = {
    "train": [
        ("Valkyria Chronicles III", [
            "Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ playing video "
            "game developed by Sega and Media.Vision for the PlayStation Portable .",
            "The game began development in 2010 , carrying over a large portion of the work .",
        ]),
        ("Tower Building of the Little Rock Arsenal", [
            "The Tower Building of the Little Rock Arsenal , also known as U.S. Arsenal "
            "Building , is a building located in MacArthur Park in downtown Little Rock .",
        ]),
    ],
    "valid": [
        ("Homarus gammarus", [
            "Homarus gammarus , known as the European lobster or common lobster , is a species "
            "of clawed lobster from the eastern Atlantic Ocean , Mediterranean Sea and parts "
            "of the Black Sea .",
            "It may grow to a length of 60 cm ( 24 in ) and a mass of 6 kilograms ( 13 lb ) .",
        ]),
    ],
    "test": [
        ("Robert Boulter", [
            "Robert Boulter is an English film , television and theatre actor . He had a "
            "guest @-@ starring role on the television series The Bill in 2000 .",
            "In 2006 , Boulter starred alongside Whishaw in the play Citizenship – written by "
            "Mark Ravenhill . It cost £ 1 @,@ 000 .",
        ]),
    ],
}  # fmt: skip


def wikitext_split(split):
    """The raw text of one fixture split (``train``, ``valid`` or ``test``)."""
    lines = [" \n"]
    for title, paragraphs in _ARTICLES[split]:
        lines += [f" = {title} = \n", " \n"]
        for number, paragraph in enumerate(paragraphs):
            if number == 1:
                lines += [" = = History = = \n", " \n"]
            lines += [f" {paragraph} \n", " \n"]
    return "".join(lines)


def write_wikitext(root, folder=None, ext="raw"):
    """Write ``wiki.{train,valid,test}.{ext}`` into ``root`` (or ``root/folder``), bytes
    exactly as the release has them; returns ``{split: text}``."""
    target = Path(root) / folder if folder else Path(root)
    target.mkdir(parents=True, exist_ok=True)
    written = {}
    for split in ("train", "valid", "test"):
        text = wikitext_split(split)
        (target / f"wiki.{split}.{ext}").write_bytes(text.encode("utf-8"))
        written[split] = text
    return written


def train_byte_level_bpe(texts, vocab_size=320):
    """A GPT-2-style tokenizer (byte-level pre-tokenizer, BPE) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer
