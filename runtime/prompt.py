"""Prompt and lyric formatting, identical to diffusers' ``AceStepPipeline`` (pipeline_ace_step.py).

The newline layout of the SFT template is load-bearing: the text encoder was trained on it.
"""

from __future__ import annotations

SFT_GEN_PROMPT = "# Instruction\n{}\n\n# Caption\n{}\n\n# Metas\n{}<|endoftext|>\n"
TEXT2MUSIC_INSTRUCTION = "Fill the audio semantic mask based on the given conditions:"


def metadata_string(bpm=None, keyscale=None, timesignature=None, audio_duration=None) -> str:
    """Mirrors ``AceStepPipeline._build_metadata_string``: N/A for missing values, whole seconds."""
    bpm_str = str(bpm) if bpm is not None and bpm > 0 else "N/A"
    ts_str = timesignature if timesignature and timesignature.strip() else "N/A"
    ks_str = keyscale if keyscale and keyscale.strip() else "N/A"
    dur_str = f"{int(audio_duration)} seconds" if audio_duration is not None and audio_duration > 0 else "30 seconds"
    return f"- bpm: {bpm_str}\n- timesignature: {ts_str}\n- keyscale: {ks_str}\n- duration: {dur_str}\n"


def format_prompt(
    prompt: str,
    lyrics: str = "",
    vocal_language: str = "en",
    audio_duration: float = 60.0,
    instruction: str | None = None,
    bpm=None,
    keyscale: str | None = None,
    timesignature: str | None = None,
) -> tuple[str, str]:
    """Mirrors ``AceStepPipeline._format_prompt``: returns ``(text for the encoder, lyric text)``."""
    instruction = instruction if instruction is not None else TEXT2MUSIC_INSTRUCTION
    if not instruction.endswith(":"):
        instruction = instruction + ":"
    metas = metadata_string(bpm, keyscale, timesignature, audio_duration)
    text = SFT_GEN_PROMPT.format(instruction, prompt, metas)
    lyric_text = f"# Languages\n{vocal_language}\n\n# Lyric\n{lyrics}<|endoftext|>"
    return text, lyric_text
