"""docs/protocol.md is the normative text: its tags, error codes and layouts must match the code."""

from __future__ import annotations

import dataclasses
import os
import re
import struct

import msgspec
import pytest

from duprep import frame, table

from .conftest import ROOT

DOC = open(os.path.join(ROOT, "docs", "protocol.md"), encoding="utf-8").read()


def _rows_with_class_and_tag() -> dict[str, int]:
    """Every markdown table row of the form | NAME | `Class` | tag | ... |."""
    rows = {}
    for m in re.finditer(r"^\|[^|\n]*\|\s*`(\w+)`\s*\|\s*(\d+)\s*\|", DOC, re.M):
        rows.setdefault(m.group(1), int(m.group(2)))
    return rows


def test_every_frame_and_bus_item_tag_is_documented_as_coded():
    rows = _rows_with_class_and_tag()
    classes = [frame.Hello, frame.Call, frame.Send, frame.Relay, frame.CallMe, frame.Welcome, frame.Reply,
               frame.Defer, frame.Push, frame.Error, frame.Chunk, frame.Request, frame.Deliver, frame.Close]
    for cls in classes:
        assert cls.__name__ in rows, f"{cls.__name__} missing from docs/protocol.md"
        assert rows[cls.__name__] == cls.__struct_config__.tag, cls.__name__


def test_every_documented_field_list_is_the_structs_in_order():
    """The last column of each frame and bus item row: the Struct's fields, in order, with defaults where it has them."""
    seen = set()
    for m in re.finditer(r"^\|[^|\n]*\|\s*`(\w+)`\s*\|\s*[-\d]+\s*\|(?:[^|\n]*\|)?([^|\n]*`\w+: [^|\n]*)\|\s*$",
                         DOC, re.M):
        cls = getattr(frame, m.group(1))
        documented = re.findall(r"`(\w+): [^`=]*?( = [^`]*)?`", m.group(2))
        assert [name for name, _ in documented] == list(cls.__struct_fields__), cls.__name__
        defaults = len(cls.__struct_defaults__)
        assert [bool(d) for _, d in documented] == [False] * (len(documented) - defaults) + [True] * defaults, \
            cls.__name__
        seen.add(cls)
    assert {frame.Hello, frame.Call, frame.Reply, frame.Chunk, frame.Request, frame.Origin, frame.Deliver} <= seen


def test_table_layout_strings_match_the_code():
    for name in ("HEADER_FORMAT", "A_FORMAT", "R_FORMAT", "S_FORMAT", "PROC_FORMAT", "HAND_FORMAT"):
        documented = re.findall(rf'`{name} = "([^"]+)"`', DOC)
        assert documented, f"{name} missing from docs/protocol.md"
        assert set(documented) == {getattr(table, name)}, name
        struct.calcsize(getattr(table, name))


def test_error_codes_are_documented():
    for code, name in frame.ErrorCode.names.items():
        assert re.search(rf"\|\s*{code}\s*\|\s*`{name}`", DOC), f"error {code} {name} not in the errors table"


def test_documented_hex_examples_decode_to_what_they_say():
    """Every hex dump of a whole frame in the doc decodes with the real decoders."""
    decoders = (frame.client_decoder(), frame.server_decoder(), frame.client_decoder())
    checked = 0
    for token in set(re.findall(r"\b(0000[0-9a-f]{6,})\b", DOC)):
        data = bytes.fromhex(token)
        assert struct.unpack(">I", data[:4])[0] == len(data) - 4, f"length prefix of {token} is wrong"
        body = data[4:]
        assert any(_decodes(d, body) for d in decoders) or _decodes(msgspec.msgpack.Decoder(frame.CallMe), body), token
        checked += 1
    assert checked >= 8, f"only {checked} worked hex examples found in docs/protocol.md"


def _decodes(decoder: msgspec.msgpack.Decoder, body: bytes) -> bool:
    try:
        decoder.decode(body)
        return True
    except (msgspec.DecodeError, ValueError):
        return False


def test_the_printable_rule_for_names_is_the_one_the_receiver_applies():
    """protocol.md 1.4 spells out str.isprintable() in Unicode categories for clients in other languages."""
    import sys
    import unicodedata
    refused = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"}
    assert "Cc, Cf, Cs, Co, Cn" in DOC and "Zl, Zp or Zs" in DOC and "except U+0020 SPACE" in DOC
    if sys.version_info[:2] == (3, 11):          # the version the doc names
        assert f"({unicodedata.unidata_version} for Python 3.11)" in DOC
    for cp in range(sys.maxunicode + 1):
        c = chr(cp)
        assert c.isprintable() == (c == " " or unicodedata.category(c) not in refused), hex(cp)
    assert not any(c.isprintable() for c in "\u00a0\u3000\u00ad\u200d")


def test_the_smallest_max_frame_the_doc_promises():
    """protocol.md 1.2: max_frame is never below 722 and the largest valid HELLO body is 73 bytes."""
    from duprep.gateway.acceptor import BUS_OVERHEAD
    assert BUS_OVERHEAD == 302 and 1024 - BUS_OVERHEAD == 722 and "never" in DOC and "**722**" in DOC
    assert len(msgspec.msgpack.encode(frame.Hello(2**32 - 1, "x" * frame.MAX_NAME))) == 73


def test_the_systemd_units_verify_cleanly(tmp_path):
    """systemd-analyze verify (a typo in a directive is only a warning at install time, and then the
    option silently does nothing); the install paths are pointed at this checkout's."""
    import shutil
    import subprocess
    import sys
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    duprep_bin = os.path.join(os.path.dirname(sys.executable), "duprep")
    units = []
    for name in sorted(os.listdir(os.path.join(ROOT, "systemd"))):
        if not name.endswith((".service", ".socket")):
            continue            # (60-duprep.conf is a sysctl.d file)
        text = open(os.path.join(ROOT, "systemd", name), encoding="utf-8").read()
        text = text.replace("/opt/duprep/.venv/bin/duprep", duprep_bin).replace("/opt/myapp", str(tmp_path))
        (tmp_path / name).write_text(text)
        units.append(str(tmp_path / name))
    assert len(units) == 4
    out = subprocess.run([analyze, "verify", *units], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    problems = [line for line in (out.stdout + out.stderr).splitlines()
                if "network.target" not in line and line.strip()]
    assert out.returncode == 0 and not problems, problems


def test_the_instance_template_has_the_gateway_units_settings():
    """duprep@.service must not drift from duprep.service: the same [Service] directives, but the
    instance name and options from %i and its environment file."""
    def service(name):
        text = open(os.path.join(ROOT, "systemd", name), encoding="utf-8").read()
        body = text.split("[Service]\n", 1)[1].split("\n[Install]", 1)[0]
        return [line for line in body.splitlines() if line and not line.startswith("#")]
    plain, template = service("duprep.service"), service("duprep@.service")
    assert [x for x in template if not x.startswith(("ExecStart=", "EnvironmentFile="))] == \
        [x for x in plain if not x.startswith("ExecStart=")]
    assert "ExecStart=/opt/duprep/.venv/bin/duprep serve --instance %i $DUPREP_ARGS" in template
    assert "EnvironmentFile=/etc/duprep/%i.env" in template


def test_the_sysctl_file_gives_the_queues_the_readme_promises():
    """systemd/60-duprep.conf and what README.md says a gateway takes with it."""
    from benchmarks import sysctl
    from duprep import queues
    values = sysctl.read_conf(sysctl.INSTALL_CONF)
    lim = queues.KernelLimits(msg_max=values["fs.mqueue.msg_max"], msgsize_max=values["fs.mqueue.msgsize_max"],
                              queues_max=256, rlimit_msgqueue=64 << 20)       # the units' LimitMSGQUEUE=64M
    assert queues.plan(limits=lim) == queues.QueuePlan(64, 65536)
    by_hand = queues.plan(limits=dataclasses.replace(lim, rlimit_msgqueue=819200))
    assert (by_hand.depth, by_hand.msgsize) == (12, 16384)
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert "takes 64 messages of 64 KiB" in readme and "it takes 12 of 16 KiB" in readme
