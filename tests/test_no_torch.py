"""The runtime generates with torch, diffusers and transformers made unimportable."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_runtime_and_cli_generate_without_torch(tiny, tmp_path):
    out = tmp_path / "no_torch.wav"
    script = textwrap.dedent(f"""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "diffusers", "transformers"):
                    raise ImportError(f"{{name}} is blocked in this test")

        sys.meta_path.insert(0, Block())
        for mod in ("torch", "diffusers", "transformers"):
            try:
                __import__(mod)
            except ImportError:
                pass
            else:
                raise SystemExit(f"{{mod}} is importable")

        from acestep_trt.runtime import AceStepRuntime
        rt = AceStepRuntime.load({str(tiny.artifacts)!r})
        out = rt(prompt=["piano", "guitar"], lyrics=["la", ""], audio_duration=0.7, seed=[1, 2])
        assert out.audios.shape == (2, 2, rt.config.latent_length(0.7) * 1920), out.audios.shape

        from acestep_trt.cli import main
        try:
            main(["generate", {str(tiny.artifacts)!r}, "--prompt", "piano", "--duration", "0.5",
                  "--out", {str(out)!r}])
        except SystemExit as exit:
            assert exit.code in (0, None), exit.code
        leaked = [m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers")]
        assert not leaked, leaked
        print("OK")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout
    assert out.is_file() and out.stat().st_size > 1000
