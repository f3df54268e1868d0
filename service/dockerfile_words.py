"""The words of a Dockerfile's instructions, split and processed as the Docker daemon's parser
and builder do (moby/buildkit ``frontend/dockerfile``): an instruction's leading flags
(``extractBuilderFlags``), an ARG's words (``parseWords``), and shell-word processing
(``shell.Lex.ProcessWord``: quotes, the escape token, variables), which a FROM's name and an
ARG's default go through. Used by ``service/dockerfile.py``.
"""

from __future__ import annotations

from collections.abc import Mapping

# Go's unicode.IsSpace: where the parser trims lines and splits words.
GO_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
_LATIN1_SPACE = "\t\n\v\f\r \x85\xa0"  # the same, for flags, which Go reads a byte at a time

# A variable's value and the build arguments it came from (to name the field at fault).
Value = tuple[str, tuple[str, ...]]
# ${X:-${Y:-…}} nested deeper is refused: each level is a Python frame here (Go's stacks grow).
MAX_NESTING = 32


class WordRefused(ValueError):
    """A word that not every Docker version processes alike, or that none processes."""


def builder_flags(rest: str, *, flag_values: bool) -> tuple[list[str], str]:
    """The leading ``--flags`` of ``rest`` and what follows them, as the parser's
    extractBuilderFlags splits them: a byte at a time (so a string of Latin-1 characters stands
    for Go's runes), quotes and ``\\`` escapes processed. Newer parsers (``flag_values``) also
    take ``--flag value``; older ones leave ``value`` to the arguments."""
    line = rest.encode("utf-8", "surrogateescape").decode("latin-1")
    words: list[str] = []
    word: list[str] = []
    phase, quote, blank_ok = "space", "", False
    parsing_value, need_value = False, True
    pos = 0
    while pos <= len(line):
        at_end = pos == len(line)
        ch = "" if at_end else line[pos]
        if phase == "space":
            if at_end:
                break
            if ch in _LATIN1_SPACE:
                pos += 1
                continue
            if not parsing_value and (ch != "-" or line[pos + 1:pos + 2] != "-"):
                return words, _utf8(line[pos:])
            phase = "word"
        if at_end:
            if "".join(word) != "--" and (blank_ok or word):
                words.append("".join(word))
            break
        if phase == "word":
            if ch in _LATIN1_SPACE:
                phase, text = "space", "".join(word)
                if parsing_value:
                    words[-1] += "=" + text
                    parsing_value, need_value = False, True
                else:
                    if text == "--":
                        return words, _utf8(line[pos:])
                    if blank_ok or word:
                        parsing_value = parsing_value or (flag_values and need_value)
                        words.append(text)
                word, blank_ok = [], False
                pos += 1
                continue
            if ch == "=" and need_value:
                need_value = False
            if ch in "'\"":
                quote, blank_ok, phase = ch, True, "quote"
                pos += 1
                continue
            if ch == "\\":
                if pos + 1 == len(line):
                    pos += 1
                    continue
                pos += 1
                ch = line[pos]
            word.append(ch)
            pos += 1
            continue
        if ch == quote:
            phase = "word"
            pos += 1
            continue
        if ch == "\\":
            if pos + 1 == len(line):
                phase = "word"
                pos += 1
                continue
            pos += 1
            ch = line[pos]
        word.append(ch)
        pos += 1
    return words, ""


def _utf8(latin1: str) -> str:
    return latin1.encode("latin-1").decode("utf-8", "surrogateescape")




def parse_words(rest: str, escape: str) -> list[str]:
    """The parser's parseWords: words split at unquoted spaces, quotes and escapes kept (the
    shell-word processing that follows removes them)."""
    words: list[str] = []
    word: list[str] = []
    phase, quote, blank_ok, pos = "space", "", False, 0
    while pos <= len(rest):
        at_end = pos == len(rest)
        ch = "" if at_end else rest[pos]
        if phase == "space":
            if at_end:
                break
            if ch in GO_SPACE:
                pos += 1
                continue
            phase = "word"
        if at_end:
            if blank_ok or word:
                words.append("".join(word))
            break
        if phase == "word":
            if ch in GO_SPACE:
                if blank_ok or word:
                    words.append("".join(word))
                phase, word, blank_ok = "space", [], False
                pos += 1
                continue
            if ch in "'\"":
                quote, blank_ok, phase = ch, True, "quote"
            if ch == escape:
                if pos + 1 == len(rest):
                    pos += 1
                    continue
                word.append(ch)
                pos += 1
                ch = rest[pos]
            word.append(ch)
            pos += 1
            continue
        if ch == quote:
            phase = "word"
        if ch == escape and quote != "'":
            if pos + 1 == len(rest):
                phase = "word"
                pos += 1
                continue
            word.append(ch)
            pos += 1
            ch = rest[pos]
        word.append(ch)
        pos += 1
    return words


class _ShellWord:
    """The builder's shell-word processing (buildkit ``shell.Lex.ProcessWord``) of one word,
    for the forms every Docker version reads alike; anything else is :class:`WordRefused`."""

    def __init__(self, text: str, env: Mapping[str, Value], escape: str):
        self.text, self.env, self.escape = text, env, escape
        self.pos, self.used, self.depth = 0, [], 0

    def process(self) -> Value:
        value = self._until(None)
        return value, tuple(dict.fromkeys(self.used))

    def _refuse(self, why: str) -> WordRefused:
        return WordRefused(why)

    def _peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def _next(self) -> str:
        ch = self._peek()
        self.pos += 1
        return ch

    def _until(self, stop: str | None) -> str:
        out = []
        while self.pos < len(self.text):
            ch = self._peek()
            if ch == stop:
                self.pos += 1
                return "".join(out)
            if ch == "'":
                out.append(self._single_quoted())
            elif ch == '"':
                out.append(self._double_quoted())
            elif ch == "$":
                out.append(self._dollar())
            else:
                self.pos += 1
                if ch == self.escape:
                    if self.pos == len(self.text):
                        break  # an escape token at the end is dropped
                    ch = self._next()
                out.append(ch)
        if stop is not None:
            raise self._refuse(f"no matching {stop}")
        return "".join(out)

    def _single_quoted(self) -> str:
        self.pos += 1
        end = self.text.find("'", self.pos)
        if end < 0:
            raise self._refuse("no matching single quote")
        value, self.pos = self.text[self.pos:end], end + 1
        return value

    def _double_quoted(self) -> str:
        self.pos += 1
        out = []
        while True:
            ch = self._peek()
            if ch == "":
                raise self._refuse("no matching double quote")
            if ch == '"':
                self.pos += 1
                return "".join(out)
            if ch == "$":
                out.append(self._dollar())
                continue
            self.pos += 1
            if ch == self.escape:
                if not self._peek():
                    continue  # dropped; the quote is then unterminated
                if self._peek() in ('"', "$", self.escape):
                    ch = self._next()  # only these are escaped; another escape token stays
            out.append(ch)

    def _name(self) -> str:
        """A variable's name: ASCII letters, digits and ``_``; what versions read differently
        (positional and special parameters, Unicode letters) is refused."""
        start = self.pos
        first = self._peek()
        if first and (first.isdigit() or first in "@*#?-$!"):
            raise self._refuse(f"${first} is read differently by Docker versions")
        while (ch := self._peek()) and (ch.isascii() and (ch.isalnum() or ch == "_")):
            self.pos += 1
        if (ch := self._peek()) and not ch.isascii() and (ch.isalnum() or ch == "_"):
            raise self._refuse("a variable name with a non-ASCII letter")
        return self.text[start:self.pos]

    def _lookup(self, name: str) -> tuple[str, bool]:
        if name not in self.env:
            return "", False
        value, sources = self.env[name]
        self.used.extend(sources)
        return value, True

    def _dollar(self) -> str:
        self.pos += 1
        if self._peek() != "{":
            name = self._name()
            return self._lookup(name)[0] if name else "$"
        self.pos += 1
        if self._peek() in ("", "{", "}", ":"):
            raise self._refuse("bad substitution")
        name = self._name()
        ch = self._next()
        if ch == "}":
            return self._lookup(name)[0]
        colon = ch == ":"
        if colon:
            ch = self._next()
        if ch not in ("-", "+"):
            raise self._refuse(f"${{{name}{':' if colon else ''}{ch}…}} is not read alike by every Docker version")
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise self._refuse(f"substitutions nested more than {MAX_NESTING} deep")
        word = self._until("}")
        self.depth -= 1
        value, is_set = self._lookup(name)
        unset = not is_set or (colon and value == "")
        if ch == "-":
            return word if unset else value
        return "" if unset else word


def process_word(text: str, env: Mapping[str, Value], escape: str) -> Value:
    """``text`` with its quotes, escapes and variables (``env``) processed, and the build
    arguments that went into it. Raises :class:`WordRefused`."""
    return _ShellWord(text, env, escape).process()
