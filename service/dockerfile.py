"""The images a Dockerfile makes the Docker daemon read, found the way the daemon finds them.

A build's base images are sources, authorised like a publish's (``service/build_sources.py``):
every ``FROM`` that names neither ``scratch`` nor an earlier stage, every ``COPY --from`` that
names neither an earlier stage nor a stage index, and every such ``COPY --from`` of the ONBUILD
triggers that a ``FROM`` runs. imagepub builds with the daemon's legacy builder; this module
follows what it does (moby ``builder/dockerfile``, its parser from moby/buildkit
``frontend/dockerfile/parser``, Docker 20.10 and later):

- the text: lines split at ``\\n`` only (a ``\\r`` before it dropped), a UTF-8 byte-order mark
  dropped, parser directives (``# escape=``) read from the leading comment lines, comment and
  blank lines skipped, a line continued when its escape token ends it, instruction names in
  any case, flags (``--from=``, ``--platform=``) split off before the arguments;
- ``FROM name [AS stage]``: ``name`` with the meta arguments substituted (the ARGs before the
  first FROM, each overridden by a build argument of the request, and the proxy variables
  Docker predefines), as a shell word (quotes, the escape token, ``$X``, ``${X}``,
  ``${X:-word}``, ``${X:+word}``, the last two also without the colon); then an earlier stage's name (in any case) is that stage
  and runs its ONBUILD triggers, ``scratch`` (or nothing) is no image, anything else an image;
- ``COPY --from=value``: taken as written (the legacy builder substitutes nothing there): an
  earlier stage's name, a stage index, or an image. ``ADD --from`` is read the same way,
  although the legacy builder refuses it.

An ``ADD`` whose source is a URL makes the daemon download it, itself, from its own network
(the host's, whatever network the build's ``RUN`` steps are given): the cloud's metadata
service and every internal address are in reach, and what it fetches lands in the image. Such
a source is refused (:class:`RemoteSource`), and so is a source that a variable gives, which may
be one: in the Dockerfile, in its ONBUILD triggers and in a base image's.

Where Docker versions read a Dockerfile differently, or where a name cannot be resolved without
the daemon, :class:`Unreadable` is raised rather than a guess: parser directives after one that
only newer versions know (``# check=``), an escape token escaped at the end of a line (newer
versions do not continue that line, older ones do), more than one ``\\r`` ending a line,
heredocs (newer versions read the lines after ``<<WORD`` as its body, older ones as
instructions), lines longer than Docker reads, text that is not UTF-8, substitutions beyond
these (``${X#pattern}``, ``$1``, ``$@``, …), a Dockerfile that no version builds
(an instruction other than ARG before the first FROM, a FROM without one name), and one past
bounds no real Dockerfile reaches, which keep what one costs the API small (stages, ONBUILD
instructions, images read, nested substitutions; ``service/build_sources.py`` bounds its size).
The words of an instruction are split and processed in ``service/dockerfile_words.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from .dockerfile_words import GO_SPACE, Value, WordRefused, builder_flags, parse_words, process_word

_TOKEN_SPACE = re.compile(r"[\t\v\f\r ]+")  # where instructions and FROM's arguments are split
_GO_S = "[\t\n\f\r ]"  # Go's \s
_DIRECTIVE = re.compile(rf"#{_GO_S}*([a-zA-Z][a-zA-Z0-9]*){_GO_S}*={_GO_S}*(.+?){_GO_S}*")
_DIRECTIVE_BODY = re.compile(rf"([a-zA-Z][a-zA-Z0-9]*){_GO_S}*={_GO_S}*(.+?){_GO_S}*")
# A word that newer parsers take for a heredoc (`<<EOF`, `<<-EOF`, `2<<"EOF"`), and more.
_HEREDOC = re.compile(rf"(?:^|[{GO_SPACE}])[0-9]*<<-?[^<{GO_SPACE}]")
_ONBUILD = re.compile(rf"^{_GO_S}*ONBUILD{_GO_S}*", re.IGNORECASE | re.ASCII)
_STAGE_NAME = re.compile(r"[a-z][a-z0-9\-_.]*", re.ASCII)
_STAGE_INDEX = re.compile(r"[+-]?[0-9]+", re.ASCII)
# Lines Go's bufio.Scanner reads (64 KiB with the newline); a longer one ends the parse.
MAX_LINE_BYTES = 64 * 1024 - 2
# More than any real Dockerfile has: they bound the work one Dockerfile costs the API (and the
# worker, which looks up every image it reads).
MAX_STAGES = 100
MAX_TRIGGERS = 100  # ONBUILD instructions in one stage
MAX_IMAGE_USES = 500
# Build arguments the legacy builder substitutes without an ARG (builtinAllowedBuildArgs).
PREDEFINED_ARGS = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "FTP_PROXY", "ftp_proxy", "NO_PROXY", "no_proxy")
_BOM = b"\xef\xbb\xbf"


class Unreadable(ValueError):
    """The Dockerfile cannot be read the way every daemon will read it; ``field`` names the
    request field at fault (``dockerfile``, or ``build_args.X`` when a build argument is)."""

    def __init__(self, message: str, field: str = "dockerfile"):
        super().__init__(message)
        self.field = field


class RemoteSource(ValueError):
    """An ``ADD`` that would make the daemon download a URL (or might: a source from a variable)."""

    field = "dockerfile"


@dataclass(frozen=True)
class ImageUse:
    """An image the build reads: ``reference`` as the daemon will resolve it."""

    reference: str
    line: int
    instruction: str  # "FROM", "COPY --from", "ONBUILD COPY --from"
    field: str = "dockerfile"  # or "build_args.X" when a build argument gave (part of) it
    # A FROM's: the names of the stages built before it ("" for an unnamed one); the ONBUILD
    # triggers of the image it reads run among them.
    earlier: tuple[str, ...] = ()


def image_uses(data: bytes, build_args: Mapping[str, str]) -> list[ImageUse]:
    """Every image the Dockerfile ``data`` makes the daemon read, in order, with the request's
    ``build_args``. Raises :class:`Unreadable`."""
    lines = _lines(data)
    reader = _Reader(_escape_token(lines), build_args)
    for number, line in _logical_lines(lines, reader.escape):
        reader.instruction(number, line)
    return reader.uses


def trigger_uses(triggers: Sequence[str], earlier: tuple[str, ...], line: int) -> list[ImageUse]:
    """The images that the ONBUILD ``triggers`` of an image read when a FROM on ``line``, after
    the stages ``earlier``, uses it."""
    if len(triggers) > MAX_TRIGGERS:
        raise Unreadable(f"line {line}: the image has more than {MAX_TRIGGERS} ONBUILD triggers")
    return _triggered([(line, _trigger_from_values(text, line)) for text in triggers], earlier)


# --- the text ---------------------------------------------------------------------------------


def _lines(data: bytes) -> list[str]:
    data = data.removeprefix(_BOM)
    raw = data.split(b"\n")
    if raw[-1] == b"":
        raw.pop()
    lines = []
    for number, line in enumerate(raw, 1):
        if len(line) > MAX_LINE_BYTES:
            raise Unreadable(f"line {number} is longer than Docker reads ({MAX_LINE_BYTES} bytes)")
        if line.endswith(b"\r\r"):
            raise Unreadable(f"line {number} ends with more than one carriage return, which Docker versions read differently")
        try:
            lines.append(line.removesuffix(b"\r").decode("utf-8"))
        except UnicodeDecodeError:
            raise Unreadable(f"line {number} is not UTF-8 text") from None
    return lines


def _directives(lines: list[str], keys: frozenset[str], prefix_then_space: bool) -> str:
    """The escape token after the parser directives, as one generation of parsers reads them:
    older ones match ``#\\s*key=value`` and know ``escape`` and ``syntax``; newer ones strip
    any Unicode space after the ``#`` and know ``check`` too. Reading stops at the first line
    that is no known directive."""
    escape, seen = "\\", set()
    for number, line in enumerate(lines, 1):
        token = line.lstrip(GO_SPACE)
        if prefix_then_space:
            match = _DIRECTIVE_BODY.fullmatch(token[1:].lstrip(GO_SPACE)) if token.startswith("#") else None
        else:
            match = _DIRECTIVE.fullmatch(token)
        if match is None or match[1].lower() not in keys:
            break
        key = match[1].lower()
        if key in seen:
            raise Unreadable(f"line {number}: the {key} parser directive is given twice")
        seen.add(key)
        if key == "escape":
            if match[2] not in ("\\", "`"):
                raise Unreadable(f"line {number}: the escape token must be \\ or `")
            escape = match[2]
    return escape


def _escape_token(lines: list[str]) -> str:
    """The escape token, when every generation of parsers reads the same one."""
    tokens = {
        _directives(lines, keys, prefix_then_space)
        for keys in (frozenset({"escape", "syntax"}), frozenset({"escape", "syntax", "check"}))
        for prefix_then_space in (False, True)
    }
    if len(tokens) > 1:
        raise Unreadable("Docker versions read this Dockerfile's parser directives differently (its escape token)")
    return tokens.pop()


def _is_comment(line: str) -> bool:
    return line.lstrip(GO_SPACE).startswith("#")


def _continued(line: str, escape: str, number: int) -> tuple[str, bool]:
    """``line`` without its continuation token, and whether the next line continues it."""
    match = re.search(re.escape(escape) + "[ \t]*$", line)
    if match is None:
        return line, False
    if match.start() > 0 and line[match.start() - 1] == escape:
        raise Unreadable(f"line {number} ends with an escaped {escape}: Docker versions differ on whether the next line continues it")
    return line[: match.start()], True


def _logical_lines(lines: list[str], escape: str) -> Iterator[tuple[int, str]]:
    """Each instruction's line number and text, its continuation lines joined (comment and
    blank lines among them skipped, as the parser does)."""
    i = 0
    while i < len(lines):
        number, raw = i + 1, lines[i]
        i += 1
        if _is_comment(raw):
            continue
        line, more = _continued(raw.lstrip(GO_SPACE), escape, number)
        if not more and not line:
            continue
        parts = [line]
        while more and i < len(lines):
            raw = lines[i]
            i += 1
            if _is_comment(raw) or not raw.lstrip(GO_SPACE):
                continue
            line, more = _continued(raw, escape, i)
            parts.append(line)
        yield number, "".join(parts)


# --- instructions -----------------------------------------------------------------------------


def _split(line: str, number: int) -> tuple[str, str]:
    """The instruction's name (lower case) and the rest of its line."""
    parts = _TOKEN_SPACE.split(line.strip(GO_SPACE), maxsplit=1)
    if not parts[0].isascii():
        raise Unreadable(f"line {number}: {parts[0]!r} is no instruction")
    return parts[0].lower(), parts[1] if len(parts) == 2 else ""


def _from_values(rest: str) -> list[str]:
    """The ``--from`` value each generation of parsers finds in ``rest`` (a flag given twice
    makes the instruction an error: no value)."""
    values: dict[str, None] = {}
    for flag_values in (False, True):
        found = [value for flag in builder_flags(rest, flag_values=flag_values)[0]
                 for name, equals, value in [flag[2:].partition("=")]
                 if flag.startswith("--") and name == "from" and equals]
        if len(found) == 1:
            values[found[0]] = None
    return list(values)


# --- evaluation -------------------------------------------------------------------------------


@dataclass
class _Stage:
    name: str  # lower case; "" when it has none
    # Its ONBUILD triggers (line, --from values), run by a FROM that uses the stage.
    triggers: list[tuple[int, list[str]]]


def _stage(value: str, earlier: Sequence[str]) -> int | None:
    """The index of the earlier stage ``value`` names (the builder compares in lower case)."""
    if value and value.isascii() and value.lower() in earlier:
        return list(earlier).index(value.lower())
    return None


def _is_index(value: str) -> bool:
    """A stage index, as Go's strconv.ParseInt reads one (an out-of-range number is a name)."""
    return bool(_STAGE_INDEX.fullmatch(value)) and -(2**63) <= int(value) < 2**63


def _trigger_from_values(text: str, number: int) -> list[str]:
    """The ``--from`` values of an ONBUILD trigger, parsed on its own as the builder parses it
    when it runs (the default escape token)."""
    values = []
    for _, line in _logical_lines(_lines(text.encode("utf-8", "surrogateescape")), "\\"):
        keyword, rest = _split(line, number)
        _refuse_heredoc(keyword, line, number)
        if keyword in ("from", "onbuild"):
            raise Unreadable(f"line {number}: an ONBUILD trigger may not be {keyword.upper()}")
        if keyword in ("copy", "add"):
            if keyword == "add":
                _refuse_remote_sources(rest, "\\", number, "ONBUILD ADD")
            values += _from_values(rest)
    return values


def _triggered(triggers: Sequence[tuple[int, list[str]]], earlier: tuple[str, ...]) -> list[ImageUse]:
    """The images ONBUILD triggers read when they run after the stages ``earlier``: a
    ``--from`` that names none of those stages, nor an index, names an image."""
    return [
        ImageUse(value, number, "ONBUILD COPY --from")
        for number, values in triggers
        for value in values
        if value and _stage(value, earlier) is None and not _is_index(value)
    ]


# What the builder's ADD downloads (moby urlutil.IsURL, read here in any case).
_URL_SCHEMES = ("http://", "https://")


class _EveryName(Mapping):
    """An environment where every variable is set: a word that reads differently in it than in
    an empty one takes something from a variable."""

    def __getitem__(self, name: str) -> Value:
        return ("\0", ())

    def __contains__(self, name: object) -> bool:
        return True

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 0


def _add_sources(rest: str) -> set[str]:
    """The sources of an ADD as each generation of parsers splits them: after the flags (with
    ``--flag value`` or without), the JSON form's strings, or else the words split at spaces
    (the parser's parseMaybeJSONToList: quotes do not hold a space there), all but the last.
    Each is then processed as a shell word, as the builder expands it."""
    sources: set[str] = set()
    for flag_values in (False, True):
        args = builder_flags(rest, flag_values=flag_values)[1].strip(GO_SPACE)
        words = None
        if args.startswith("["):
            try:
                words = json.loads(args)
            except ValueError:
                pass
        if not (isinstance(words, list) and all(isinstance(word, str) for word in words)):
            words = [word for word in re.split(f"[{GO_SPACE}]+", args) if word]
        sources.update(words[:-1])
    return sources


def _refuse_remote_sources(rest: str, escape: str, number: int, instruction: str = "ADD") -> None:
    for word in sorted(_add_sources(rest)):
        try:
            plain, read = process_word(word, {}, escape)[0], process_word(word, _EveryName(), escape)[0]
        except WordRefused as exc:
            raise Unreadable(f"line {number}: {exc}") from None
        if plain.lower().startswith(_URL_SCHEMES):
            raise RemoteSource(f"line {number}: {instruction} {plain}: the daemon would download it itself, on its own "
                               "network; put the file in the context")
        if plain != read:
            raise RemoteSource(f"line {number}: {instruction} {word}: a source from a variable may be a URL, which the "
                               "daemon would download itself; name the file in the context")


def _refuse_heredoc(keyword: str, line: str, number: int) -> None:
    if keyword in ("run", "copy", "add", "onbuild") and _HEREDOC.search(line):
        raise Unreadable(f"line {number}: a heredoc (<<WORD): Docker versions read the lines after it differently")


class _Reader:
    """The Dockerfile's instructions in order: meta arguments, stages, the images they read."""

    def __init__(self, escape: str, build_args: Mapping[str, str]):
        self.escape, self.build_args = escape, build_args
        # What a meta argument's default and a FROM's name are substituted with (the builder's
        # GetAllMeta): a build argument of the request for a declared or predefined name, else
        # the declared default; a name declared without one is unset.
        self.env: dict[str, Value] = {name: (build_args[name], (name,)) for name in PREDEFINED_ARGS if name in build_args}
        self.stages: list[_Stage] = []
        self.uses: list[ImageUse] = []

    def instruction(self, number: int, line: str) -> None:
        keyword, rest = _split(line, number)
        _refuse_heredoc(keyword, line, number)
        if keyword == "from":
            self._from(number, rest)
        elif not self.stages:
            if keyword != "arg":
                raise Unreadable(f"line {number}: {keyword.upper() or 'an empty instruction'} before the first FROM")
            self._meta_arg(number, rest)
        elif keyword in ("copy", "add"):
            if keyword == "add":
                _refuse_remote_sources(rest, self.escape, number)
            earlier = [stage.name for stage in self.stages[:-1]]
            for value in _from_values(rest):
                if value and _stage(value, earlier) is None and not _is_index(value):
                    self.uses.append(ImageUse(value, number, "COPY --from"))
        elif keyword == "onbuild":
            if len(self.stages[-1].triggers) == MAX_TRIGGERS:
                raise Unreadable(f"line {number}: more than {MAX_TRIGGERS} ONBUILD instructions in one stage")
            self.stages[-1].triggers.append((number, _trigger_from_values(_ONBUILD.sub("", line, count=1), number)))
        if len(self.uses) > MAX_IMAGE_USES:
            raise Unreadable(f"line {number}: the build reads more than {MAX_IMAGE_USES} images")

    def _declare(self, name: str, default: Value | None) -> None:
        if name in self.build_args:
            self.env[name] = (self.build_args[name], (name,))
        elif default is not None:
            self.env[name] = default
        else:
            self.env.pop(name, None)

    def _expand(self, text: str, number: int) -> Value:
        try:
            return process_word(text, self.env, self.escape)
        except WordRefused as exc:
            raise Unreadable(f"line {number}: {exc}") from None

    def _meta_arg(self, number: int, rest: str) -> None:
        flags, args = builder_flags(rest, flag_values=True)
        words = parse_words(args.strip(GO_SPACE), self.escape)
        if flags or not words:
            raise Unreadable(f"line {number}: ARG takes names (and defaults), no flags")
        declared = {}
        for word in words:  # all substituted first, then declared together (as the builder does)
            key, equals, default = word.partition("=")
            if equals and not key:
                raise Unreadable(f"line {number}: an ARG without a name")
            name = self._expand(key, number)[0]
            declared[name] = self._expand(default, number) if equals else None
        for name, default in declared.items():
            self._declare(name, default)

    def _from(self, number: int, rest: str) -> None:
        args_text = builder_flags(rest, flag_values=True)[1].strip(GO_SPACE)
        args = _TOKEN_SPACE.split(args_text) if args_text else []
        if len(args) == 3 and args[1].isascii() and args[1].lower() == "as":
            name = args[2].lower() if args[2].isascii() else args[2]
            if not _STAGE_NAME.fullmatch(name):
                raise Unreadable(f"line {number}: {args[2]!r} is no valid stage name")
        elif len(args) == 1:
            name = ""
        else:
            raise Unreadable(f"line {number}: FROM takes one image (and AS a stage name)")
        if len(self.stages) == MAX_STAGES:
            raise Unreadable(f"line {number}: more than {MAX_STAGES} stages")
        value, sources = self._expand(args[0], number)
        earlier = tuple(stage.name for stage in self.stages)
        index = _stage(value, earlier)
        if index is not None:
            self.uses.extend(_triggered(self.stages[index].triggers, earlier))
        elif value not in ("scratch", ""):
            field = f"build_args.{sources[0]}" if sources else "dockerfile"
            self.uses.append(ImageUse(value, number, "FROM", field, earlier))
        self.stages.append(_Stage(name, []))
