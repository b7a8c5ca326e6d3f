"""Build deterministic tiny Qwen2-architecture models and tokenizers without a network."""

from __future__ import annotations

import argparse
import os
import random
import shutil
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.demo_data import DEMO_VOCABULARY, demo_rows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]

# Qwen2Tokenizer's split pattern: AutoTokenizer maps model_type qwen2 to Qwen2Tokenizer, which
# rebuilds the normalizer and pre-tokenizer this way, so training with the same ones keeps every
# loader (tokenizers, transformers, vLLM) producing the same ids.
QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Qwen2 style, minus its implicit default system prompt: every turn is rendered exactly as given.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class ModelPreset:
    """Shape of a generated Qwen2 model."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    # With tied embeddings a logit is at most about hidden_size * std; HF's 0.02 caps a tiny model's
    # best token probability near 0.13, so a LoRA never converges and diverges at lr 3e-3.
    initializer_range: float = 0.05

    def __post_init__(self) -> None:
        # Qwen2 (HF and vLLM) derives head_dim as hidden_size // num_attention_heads.
        if self.hidden_size != self.num_attention_heads * self.head_dim:
            raise ValueError("hidden_size must equal num_attention_heads * head_dim")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")


PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=512,
        vocab_size=1024,
    ),
    "bench": ModelPreset(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        intermediate_size=1536,
        vocab_size=4096,
    ),
}

_ENGLISH = """
the be to of and a in that have I it for not on with he as you do at this but his by from they we say her
she or an will my one all would there their what so up out if about who get which go me when make can like
time no just him know take people into year your good some could them see other than then now look only come
its over think also back after use two how our work first well way even new want because any these give day
most us is are was were been has had did said made went came took saw knew thought told found gave felt left
called asked seemed turned began kept brought held stood heard let meant set put ran moved lived believed
world life hand part child eye woman man place week case point government company number group problem fact
home water room mother area money story month lot right study book job word business issue side kind head
house service friend father power hour game line end member law car city community name president team minute
idea kid body information school face others level office door health person art war history party result
change morning reason research girl guy moment air teacher force education food music market family system
question night student program country state night morning evening today tomorrow yesterday always never often
sometimes usually maybe please thank thanks hello goodbye yes okay sure very really quite rather almost enough
small large big little long short high low old young early late important few public bad same able last
black white red green blue yellow orange purple brown gray pink dark light bright clear simple easy hard
open close start stop run walk talk read write speak listen learn teach play work sleep eat drink buy sell pay
send receive build break fix help move turn show try call ask need feel become leave put mean keep begin seem
hear let hold bring happen provide sit stand lose add grow offer remember love consider appear wait serve die
include continue allow lead understand watch follow create spend win expect reach kill remain suggest raise pass
report decide pull return explain hope develop carry drive agree support hit produce eat cover catch draw choose
cause point listen plan real full whole free sure certain clear human local late hard major better economic strong
possible whole special social best only political true national main different large general international
sentence paragraph text message answer question reply user assistant system model data file input output
value result error test example sample train training token tokens language english letter number digit
computer network server client request response list item table column row field record string code function
first second third fourth fifth one two three four five six seven eight nine ten hundred thousand million
monday tuesday wednesday thursday friday saturday sunday january february march april may june july august
september october november december spring summer autumn winter north south east west left right up down
cat dog bird fish horse cow sheep pig chicken mouse tree flower grass leaf river lake sea ocean mountain hill
sun moon star sky cloud rain snow wind fire stone rock sand road street bridge town village country island
apple orange banana bread cheese milk coffee tea sugar salt rice meat egg soup cake fruit vegetable dinner lunch
breakfast kitchen bedroom bathroom window wall floor roof garden table chair bed desk lamp clock phone box bag
shirt shoe hat coat dress pocket ring watch key cup plate glass bottle knife fork spoon paper pen pencil
doctor nurse police driver farmer worker writer artist singer player king queen prince princess soldier
happy sad angry afraid tired hungry thirsty sick well fine great nice wonderful terrible awful beautiful ugly
quick slow fast quiet loud hot cold warm cool wet dry clean dirty rich poor cheap expensive safe dangerous
because although however therefore while during before after until since without within between among through
""".split()
_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today?",
    "Please answer the question in one word.",
    "It was a good day, and everyone was happy.",
    "This is a test of the tokenizer: numbers 0123456789, symbols !@#$%^&*()_+-=[]{};':\",./<>?\\|`~",
    "You are a helpful assistant.",
    "What is the capital of France? Paris.",
    "I don't know; it's hard to say, isn't it?",
]


def _corpus(seed: int = 1234) -> list[str]:
    """Deterministic training text: demo vocabulary, demo prompts, English words, all printable ASCII."""
    rng = random.Random(seed)
    words = sorted(set(_ENGLISH))
    lines: list[str] = []
    # Repeat task words so each becomes one token in both " word" and "word" form.
    for _ in range(100):
        lines.append(" ".join(DEMO_VOCABULARY))
        lines.append("\n".join(DEMO_VOCABULARY))
    for row in demo_rows(300, seed=seed):
        lines.append("".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in row["messages"]))
    # Each surface form (" word", "word", " Word", " WORD") gives its own merges, which the larger
    # presets need to fill their vocabulary.
    for _ in range(3):
        lines.append(" ".join(words))
        lines.append("\n".join(words))
        lines.append(" ".join(w.capitalize() for w in words))
        lines.append(" ".join(w.upper() for w in words))
    for _ in range(2000):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
        lines.append(sentence.capitalize() + rng.choice([".", ".", "?", "!", ","]))
    lines.extend(_SENTENCES * 10)
    lines.append(" ".join(str(i) for i in range(1000)))
    lines.append(string.printable)
    lines.append(" ".join(string.printable))
    return lines


def build_tokenizer(vocab_size: int, model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with ChatML special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    # Byte-level: every byte is in the alphabet, so no text is ever unknown.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        bos_token=None,
        padding_side="right",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def _write_model(out_dir: Path, preset: ModelPreset, seed: int) -> None:
    """Write tokenizer, config and weights into out_dir."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tokenizer = build_tokenizer(preset.vocab_size, preset.max_position_embeddings)
    im_end = int(tokenizer.convert_tokens_to_ids(IM_END))  # type: ignore[arg-type]  # one token: an int
    endoftext = int(tokenizer.convert_tokens_to_ids(ENDOFTEXT))  # type: ignore[arg-type]
    # Embedding rows without a token would let a random model emit ids no tokenizer can decode.
    if len(tokenizer) != preset.vocab_size:
        raise RuntimeError(f"tokenizer corpus yields {len(tokenizer)} tokens, preset wants {preset.vocab_size}")
    config = Qwen2Config(
        vocab_size=preset.vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_key_value_heads,
        max_position_embeddings=preset.max_position_embeddings,
        tie_word_embeddings=preset.tie_word_embeddings,
        initializer_range=preset.initializer_range,
        use_sliding_window=False,
        bos_token_id=endoftext,
        eos_token_id=im_end,
        pad_token_id=endoftext,
        dtype="float32",
        architectures=["Qwen2ForCausalLM"],
    )
    torch.manual_seed(seed)
    model: Any = Qwen2ForCausalLM(config)
    model = model.to(torch.float32)
    model.generation_config = GenerationConfig(
        do_sample=False, bos_token_id=endoftext, eos_token_id=im_end, pad_token_id=endoftext
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _make_readable(directory: Path) -> None:
    """Give the build ordinary modes; mkdtemp (and some writers) create owner-only files."""
    os.chmod(directory, 0o755)
    for path in directory.iterdir():
        os.chmod(path, 0o644)


def build_model(out_dir: Path, preset: str = "tiny", seed: int = 0, force: bool = False) -> Path:
    """Build (or reuse) a random-weight Qwen2 model plus tokenizer in out_dir, atomically."""
    out_dir = Path(out_dir).expanduser().resolve()
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if (out_dir / "config.json").exists() and not force:
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "config.json").exists():
        # Never replace a directory that is not a model: --out may be a typo for something precious.
        raise FileExistsError(f"{out_dir} exists, is not empty and holds no model")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    old: Path | None = None
    try:
        _write_model(tmp, PRESETS[preset], seed)
        _make_readable(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.rename(out_dir, old / "model")
        try:
            os.rename(tmp, out_dir)
        except OSError:
            # Another builder got there first; its result is as good as ours.
            if not (out_dir / "config.json").exists():
                if old is not None and not out_dir.exists():
                    os.rename(old / "model", out_dir)
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out_dir


def count_parameters(model_dir: Path) -> int:
    """Count unique parameters stored in a model dir's safetensors files."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                total += _prod(f.get_slice(name).get_shape())
    return total


def _prod(shape: list[int]) -> int:
    """Multiply a shape out."""
    n = 1
    for d in shape:
        n *= d
    return n


def main(argv: list[str] | None = None) -> None:
    """CLI: build a model directory and print it with its parameter count."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if the directory exists")
    args = parser.parse_args(argv)
    out = build_model(args.out, args.preset, args.seed, force=args.force)
    print(out)
    print(f"parameters: {count_parameters(out)}")


if __name__ == "__main__":
    main()
