"""The Linux man-pages corpus (Debian ``manpages`` + ``manpages-dev``) as plain text.

Shared by the offline sources of ``text`` (label = manual section) and ``retrieval``
(pairs linked by SEE ALSO). Files are selected **by package** (``dpkg -L``; when the
packages are not installed, the .deb is unpacked into the cache by ``harness.data.debian``),
never by folder, since other packages add pages to the same folders.

Documents and redirects. A page file is ``man<N>/<title>.<section>.gz``. A symbolic link
(``man3/pread64.3.gz -> pread.3.gz``) or a one-line ``.so man7/queue.7`` page is a
redirect: an alias of the page it points to, never a document of its own (the same text
would otherwise sit in two splits). Redirects whose target is not in the packages are
dropped; all counts are logged.

The roff → text converter (``roff_to_text``) is deliberately simple and keeps the text:

* comments (``.\\"``, ``\\"``), ``.TH`` (the title line, which names the section),
  macro definitions (``.de``/``.ig`` … ``..``) and conditionals (``.if``/``.ie``/``.el``,
  typesetter-only here) are dropped, as are layout requests (``.in``, ``.ad``, ``.ft``, …);
* ``.SH``/``.SS`` headings become lines of their own; ``.PP``/``.TP``/``.IP``/``.sp``/…
  break paragraphs (``.IP tag``/``.TP`` keep their tag); font macros (``.B``, ``.BR``,
  ``.IR``, …) keep their words, alternating ones joined without spaces as roff does;
* text lines are filled (joined with spaces) except between ``.nf``/``.fi`` and
  ``.EX``/``.EE``, where lines are kept; tbl tables (``.TS``…``.TE``) keep their cells,
  tab-separated, without the format lines;
* escapes: fonts and sizes (``\\fB``, ``\\s-1``) are removed, ``\\-`` → ``-``, ``\\e`` → ``\\``,
  named characters to ASCII (``\\[aq]`` → ``'``, ``\\[em]`` → ``--``, ``\\[bu]`` → ``*``, …;
  a few accented letters to UTF-8), zero-width ones (``\\&``, ``\\:``, ``\\%``) removed.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from harness.data import DataSourceError, MalformedRecord

log = logging.getLogger(__name__)

PACKAGES = ("manpages", "manpages-dev")
MAN_ROOT = "usr/share/man"
PAGE_RE = re.compile(r"^man(\d)/(.+)\.(\d\w*)\.gz$")  # man3/pread.3.gz -> (3, pread, 3)

# ----------------------------------------------------------------------------- roff -> text

CHARS = {  # named characters \(xx, \[xx]
    "aq": "'",
    "dq": '"',
    "bu": "*",
    "em": "--",
    "en": "-",
    "ha": "^",
    "ti": "~",
    "lq": '"',
    "rq": '"',
    "oq": "'",
    "cq": "'",
    "ga": "`",
    "+-": "+-",
    "dg": "+",
    "mi": "-",
    "sd": '"',
    "fm": "'",
    "ra": ">",
    "la": "<",
    "de": " deg",
    "co": "(C)",
    "rg": "(R)",
    "tm": "(TM)",
    "sc": "S",
    "mc": "u",
    "mu": "x",
    "di": "/",
    "<=": "<=",
    ">=": ">=",
    "!=": "!=",
    "->": "->",
    "<-": "<-",
    "rs": "\\",
    "sl": "/",
    "12": "1/2",
    "14": "1/4",
    "34": "3/4",
    "hy": "-",
    "lB": "[",
    "rB": "]",
    "lC": "{",
    "rC": "}",
    ":a": "\u00e4",
    ":o": "\u00f6",
    ":u": "\u00fc",
    ":A": "\u00c4",
    ":O": "\u00d6",
    ":U": "\u00dc",
    "'a": "\u00e1",
    "'e": "\u00e9",
    "`a": "\u00e0",
    "`e": "\u00e8",
    "^a": "\u00e2",
    "^o": "\u00f4",
    "ss": "\u00df",
}
STRINGS = {"lq": '"', "rq": '"', "-": "-", "dg": "+", "R": "(R)", "Tm": "(TM)", "<": "<", ">": ">"}  # \*x
SIMPLE = {  # one-character escapes
    "-": "-",
    "e": "\\",
    "\\": "\\",
    " ": " ",
    "~": " ",
    "0": " ",
    "'": "'",
    "`": "`",
    ".": ".",
    "t": "\t",
    "&": "",
    ":": "",
    "%": "",
    "|": "",
    "^": "",
    "c": "",
    "/": "",
    ",": "",
    ")": "",
    "{": "",
    "}": "",
    "r": "",
    "p": "",
    "a": "",
    "d": "",
    "u": "",
    "E": "",
}
ESCAPE_RE = re.compile(
    r"""\\(?:
        \((?P<char2>..) | \[(?P<charn>[^\]]*)\]            # named character
      | \*(?:\((?P<str2>..)|\[(?P<strn>[^\]]*)\]|(?P<str1>.))  # string interpolation
      | f(?:\(..|\[[^\]]*\]|.)                            # font
      | s[-+]?(?:\d|\(\d\d|\[\d+\])                       # size
      | [hvwlLNXoZDbxSHRC]'[^']*'                         # motions, widths, ...: dropped
      | [nk$gmMYV](?:\(..|\[[^\]]*\]|.)                   # registers, macro args
      | (?P<comment>".*)                                  # comment to end of line
      | (?P<one>.)
    )""",
    re.VERBOSE,
)
ALTERNATING = {"BR", "RB", "IR", "RI", "BI", "IB"}
SPACED_FONT = {"B", "I", "SM", "SB"}
PARAGRAPH = {"PP", "P", "LP", "sp", "HP", "YS", "bp"}
BREAK = {"br", "RS", "RE", "TQ", "ti"}
NOFILL_ON, NOFILL_OFF = {"nf", "EX"}, {"fi", "EE"}


def unescape(text: str) -> str:
    """Roff escapes → plain characters (see the module docstring)."""

    def replace(m: re.Match) -> str:
        if m.group("comment") is not None:
            return "\x00"  # cut here, below
        name = m.group("char2") or m.group("charn")
        if name is not None:
            return CHARS.get(name, "")
        name = m.group("str2") or m.group("strn") or m.group("str1")
        if name is not None:
            return STRINGS.get(name, "")
        one = m.group("one")
        if one is not None:
            return SIMPLE.get(one, one)
        return ""  # fonts, sizes, motions, registers

    return ESCAPE_RE.sub(replace, text).split("\x00", 1)[0]


def split_args(line: str) -> list[str]:
    """Arguments of a request line (after the macro name): blanks separate, "quotes" group
    (``""`` inside quotes is a quote), an escaped blank (``\\ ``) does not separate."""
    args, cur, i, quoted, started = [], [], 0, False, False
    while i < len(line):
        c = line[i]
        if c == "\\" and i + 1 < len(line):
            cur.append(line[i : i + 2])
            started, i = True, i + 2
            continue
        if quoted:
            if c == '"':
                if line[i + 1 : i + 2] == '"':
                    cur.append('"')
                    i += 2
                    continue
                quoted = False
            else:
                cur.append(c)
        elif c == '"' and not cur:
            quoted = started = True
        elif c in " \t":
            if started:
                args.append("".join(cur))
            cur, started = [], False
        else:
            cur.append(c)
            started = True
        i += 1
    if started:
        args.append("".join(cur))
    return args


class _Writer:
    """Collects output lines: filled paragraphs, or kept lines in no-fill mode."""

    def __init__(self):
        self.lines: list[str] = []
        self.words: list[str] = []
        self.nofill = False

    def text(self, s: str) -> None:
        if self.nofill:
            self.lines.append(s.rstrip())
        elif s.strip():
            self.words.append(s.strip())
        else:  # a blank line in fill mode is a paragraph break
            self.paragraph()

    def brk(self) -> None:
        if self.words:
            self.lines.append(" ".join(self.words))
            self.words = []

    def paragraph(self) -> None:
        self.brk()
        if self.lines and self.lines[-1] != "":
            self.lines.append("")

    def result(self) -> str:
        self.brk()
        text = "\n".join(self.lines)
        return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def roff_to_text(source: str) -> str:
    """Plain text of a man page's roff source (the ``.TH`` title line removed)."""
    out = _Writer()
    skip_until: str | None = None  # ".." after .de/.ig, "\\}" after a conditional block
    in_table = table_format = False
    tag_pending = False
    url: str | None = None
    for raw in source.splitlines():
        if skip_until is not None:
            if (skip_until == ".." and raw.strip() == "..") or (skip_until == "\\}" and "\\}" in raw):
                skip_until = None
            continue
        if raw.startswith(('.\\"', "'\\\"", '.\\"')) or raw.strip() in (".", "'"):
            continue
        if in_table:
            if raw.startswith(".TE"):
                in_table = False
                out.nofill = False
                out.paragraph()
                continue
            if table_format:  # options line (ends with ';') and format lines (the last ends with '.')
                if raw.rstrip().endswith("."):
                    table_format = False
                continue
            if raw.startswith(".T&"):
                table_format = True
                continue
            if raw.strip() in ("_", "=") or raw.startswith((".", "'")):
                continue
            cells = raw.replace("T{", "").replace("T}", "")
            out.text(unescape(cells))
            continue
        if not raw.startswith((".", "'")):
            if raw.strip() == "T}":
                continue
            out.text(unescape(raw))
            if tag_pending and raw.strip():
                out.brk()
                tag_pending = False
            continue
        macro, _, rest = raw[1:].lstrip().partition(" ")
        macro = macro.strip()
        args = split_args(rest)
        if macro in ("de", "de1", "ig", "am"):
            skip_until = ".."
        elif macro in ("if", "ie", "el"):
            if "\\{" in raw and "\\}" not in raw:
                skip_until = "\\}"
        elif macro == "TH" or macro == "so":
            continue
        elif macro == "SH" or macro == "SS":
            out.paragraph()
            heading = " ".join(unescape(a) for a in args)
            out.lines.append(heading.upper() if macro == "SH" else heading)
        elif macro in PARAGRAPH:
            out.paragraph()
        elif macro in BREAK:
            out.brk()
        elif macro == "TP":
            out.brk()
            tag_pending = True
        elif macro == "IP":
            out.brk()
            if args:
                out.text(unescape(args[0]))
        elif macro in NOFILL_ON:
            out.brk()
            out.nofill = True
        elif macro in NOFILL_OFF:
            out.nofill = False
        elif macro == "TS":
            out.brk()
            in_table = table_format = True
            out.nofill = True
        elif macro in SPACED_FONT:
            if args:
                out.text(" ".join(unescape(a) for a in args))
        elif macro in ALTERNATING:
            out.text("".join(unescape(a) for a in args))
        elif macro == "q":  # tzfile(5)'s quoting macro: .q word trailing
            out.text('"' + unescape(args[0] if args else "") + '"' + "".join(unescape(a) for a in args[1:]))
        elif macro in ("UR", "MT"):
            url = unescape(args[0]) if args else ""
        elif macro in ("UE", "ME"):
            out.text(f"<{url or ''}>" + "".join(unescape(a) for a in args))
            url = None
        elif macro == "SY":
            out.paragraph()
            out.text(" ".join(unescape(a) for a in args))
        elif macro == "OP":
            out.text("[" + " ".join(unescape(a) for a in args) + "]")
        else:
            continue  # layout requests (.in .ad .nh .hy .PD .ft .ta .ne .na .nr .ds ...) and unknown macros
        if tag_pending and macro in SPACED_FONT | ALTERNATING | {"q", "UE", "ME", "OP"} and args:
            out.brk()
            tag_pending = False
    return out.result()


# ----------------------------------------------------------------------------- sections, links

REF_RE = re.compile(r"([A-Za-z0-9_][A-Za-z0-9_.:+@-]*)\((\d\w*)\)")


def see_also_refs(roff: str) -> list[tuple[str, str]]:
    """(title, section) of every ``name(section)`` in the page's SEE ALSO section."""
    text = section_text(roff, "SEE ALSO")
    return REF_RE.findall(text) if text else []


def section_text(roff: str, heading: str) -> str:
    """Converted text of one ``.SH`` section of a roff page ('' when absent)."""
    chunks = _roff_sections(roff)
    return "".join(roff_to_text(body) for h, body in chunks if h == heading)


def _roff_sections(roff: str) -> list[tuple[str, str]]:
    """(SH heading, roff body) pairs, split on ``.SH`` lines of the source."""
    parts: list[tuple[str, list[str]]] = [("", [])]
    for line in roff.splitlines():
        if line.startswith(".SH"):
            args = split_args(line[3:])
            parts.append((" ".join(unescape(a) for a in args).upper(), []))
        else:
            parts[-1][1].append(line)
    return [(h, "\n".join(b)) for h, b in parts]


def drop_sections(roff: str, headings: set[str]) -> str:
    """The roff source without the ``.SH`` sections named in ``headings``."""
    out = []
    for heading, body in _roff_sections(roff):
        if heading in headings:
            continue
        if heading:
            out.append(f".SH {heading}")
        out.append(body)
    return "\n".join(out)


def remove_self_mentions(text: str, names: set[str]) -> str:
    """``name(2)`` → ``name`` for the page's own names: they would state its section."""
    if not names:
        return text
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.sub(rf"(?<![A-Za-z0-9_])({alternatives})\(\d\w*\)", r"\1", text)


# ----------------------------------------------------------------------------- the corpus


@dataclass
class ManPage:
    key: str  # "read(2)": title(section as in the file name)
    title: str
    section: str  # the manual section from the folder: "2", "3", ...
    package: str
    path: Path
    roff: str
    aliases: set[str] = field(default_factory=set)  # other keys that redirect here
    _texts: dict[tuple[str, ...], str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def names(self) -> set[str]:
        return {self.title} | {a.split("(")[0] for a in self.aliases}

    def text(self, *, drop: tuple[str, ...] = ()) -> str:
        """Plain text without ``.TH``, without the sections in ``drop``, own mentions unsectioned
        (converted once per ``drop``)."""
        if drop not in self._texts:
            roff = drop_sections(self.roff, set(drop)) if drop else self.roff
            self._texts[drop] = remove_self_mentions(roff_to_text(roff), self.names)
        return self._texts[drop]


def package_files(package: str) -> list[Path]:
    """Man page files (``.gz``, links included) shipped by ``package``: ``dpkg -L`` when it
    is installed, else its .deb unpacked into the cache (``harness.data.debian``)."""
    if shutil.which("dpkg"):
        done = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True)
        if done.returncode == 0:
            files = [
                Path(p) for p in done.stdout.splitlines() if p.startswith(f"/{MAN_ROOT}/man") and p.endswith(".gz")
            ]
            if files:
                return files
    from harness.data.debian import fetch_package

    if os.environ.get("HARNESS_NO_APT") and not (_unpacked(package) / ".complete").exists():
        raise DataSourceError(
            f"Debian package '{package}' is neither installed nor unpacked in the cache, and fetching is off "
            f"(HARNESS_NO_APT). Install it (apt-get install {package}) or run "
            f"`python -m harness tool debian-fetch packages=[{package}]`"
        )
    root = fetch_package(package)
    return sorted(p for p in (root / MAN_ROOT).glob("man*/*.gz"))


def source_files(packages: tuple[str, ...] = PACKAGES) -> list[Path]:
    """Every man page file of ``packages`` (the data cache keys on their sizes and times);
    none when a package is not available (the build then says how to get it)."""
    return list(_listed_files(packages))


@functools.lru_cache(maxsize=4)
def _listed_files(packages: tuple[str, ...]) -> tuple[Path, ...]:
    """The packages' file lists, asked once per process (``dpkg -L`` is a subprocess)."""
    files: list[Path] = []
    for package in packages:
        try:
            files += package_files(package)
        except DataSourceError:
            return ()
    return tuple(files)


def _unpacked(package: str) -> Path:
    from harness.data.debian import unpack_root

    return unpack_root(package)


def _man_relative(path: Path) -> str | None:
    """'man3/pread.3.gz' for a page path (system or unpacked copy)."""
    parts = path.parts
    for i in range(len(parts) - 1, 0, -1):
        if parts[i - 1] == "man" and parts[i].startswith("man"):
            return "/".join(parts[i:])
    return None


def read_gzip(path: Path) -> str:
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as exc:
        raise MalformedRecord(path, "whole file", f"not a readable gzip file ({exc})") from exc
    return data.decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=2)
def load_corpus(packages: tuple[str, ...] = PACKAGES) -> dict[str, ManPage]:
    """{key: ManPage} of every document in ``packages``, redirects folded in as aliases.
    Read once per process (treat the result as read-only)."""
    pages: dict[str, ManPage] = {}
    redirects: dict[str, str] = {}  # alias key -> man-relative target "man2/read.2.gz"
    by_relative: dict[str, str] = {}  # "man2/read.2.gz" -> key
    counts: Counter = Counter()
    for package in packages:
        for path in package_files(package):
            rel = _man_relative(path)
            m = PAGE_RE.match(rel or "")
            if not m:
                counts["not a man page path"] += 1
                continue
            folder, title, suffix = m.groups()
            key = f"{title}({suffix})"
            if path.is_symlink():
                target = Path(os.path.realpath(path))
                redirects[key] = _man_relative(target) or ""
                counts["symlink redirects"] += 1
                continue
            roff = read_gzip(path)
            so = _so_target(roff)
            if so is not None:
                redirects[key] = so + ("" if so.endswith(".gz") else ".gz")
                counts[".so redirects"] += 1
                continue
            pages[key] = ManPage(key=key, title=title, section=folder, package=package, path=path, roff=roff)
            by_relative[rel] = key
            counts["documents"] += 1
    for alias, target in sorted(redirects.items()):
        key = by_relative.get(target)
        if key is None:
            counts["redirects to pages outside the packages (dropped)"] += 1
            continue
        pages[key].aliases.add(alias)
    log.info("man pages of %s: %s", "+".join(packages), ", ".join(f"{n} {what}" for what, n in sorted(counts.items())))
    if not pages:
        raise DataSourceError(f"no man pages found in the Debian packages {', '.join(packages)}")
    return pages


def _so_target(roff: str) -> str | None:
    """'man7/queue.7' when the page is a ``.so`` redirect (only comments besides)."""
    target = None
    for line in roff.splitlines():
        if not line.strip() or line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith(".so ") and target is None:
            target = line[4:].strip()
            continue
        return None
    return target


def alias_index(pages: dict[str, ManPage]) -> dict[str, str]:
    """{key or alias key: document key}: resolves ``name(section)`` references."""
    index = {key: key for key in pages}
    for key, page in pages.items():
        for alias in page.aliases:
            index[alias] = key
    return index
