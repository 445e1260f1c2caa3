"""lowbit.runtime.machine: the one reader of /proc/cpuinfo that speed tables name the machine by."""

from lowbit.runtime import machine

X86 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Example Xeon 1234
flags\t\t: fpu sse4_2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni amx_tile

processor\t: 1
model name\t: Another name
flags\t\t: fpu
"""
ARM = """processor\t: 0
Features\t: fp asimd evtstrm crc32 sve
"""


def test_the_first_processor_is_read(tmp_path):
    p = tmp_path / "cpuinfo"
    p.write_text(X86)
    c = machine.cpu(str(p))
    assert c.name == "Example Xeon 1234"
    assert "avx512_vnni" in c.flags and "fpu" in c.flags and len(c.flags) == 11
    assert machine.isa(c.flags) == "AVX-512 VNNI"
    assert machine.vector_flags(flags=c.flags) == ["sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw",
                                                   "avx512vl", "avx512_vnni", "amx_tile"]
    assert machine.vector_flags(("amx_tile", "avx2", "avx_vnni"), c.flags) == ["amx_tile", "avx2"]


def test_instruction_set_levels_and_other_systems(tmp_path):
    assert machine.isa(frozenset({"avx2", "fma"})) == "AVX2"
    assert machine.isa(frozenset({"avx2", "avx512f"})) == "AVX-512"
    assert machine.isa(frozenset()) == "no AVX2"
    p = tmp_path / "arm"
    p.write_text(ARM)
    c = machine.cpu(str(p))
    assert c.flags >= {"asimd", "sve"} and machine.vector_flags(flags=c.flags) == ["asimd", "sve"]
    assert c.name  # no model line: the platform's name or "unknown CPU"
    missing = machine.cpu(str(tmp_path / "nothing"))
    assert missing.flags == frozenset() and missing.name


def test_this_machine():
    c = machine.cpu()
    assert isinstance(c.flags, frozenset) and c.name
    assert machine.isa() in ("AVX-512 VNNI", "AVX-512", "AVX2", "no AVX2")
    assert len(machine.load().split()) in (1, 3)
