"""Reading a build's sources (issue 18, item 3): every image a Dockerfile makes the daemon read,
found as the legacy builder finds it, and what cannot be read that way refused, not guessed.

Pure functions: no stack. The live service is attacked in tests/e2e/test_hostile_tenants.py.
"""

from __future__ import annotations

import io
import tarfile

import pytest

from service.build_sources import read_dockerfile, refusal
from service.config import Client, Limits
from service.dockerfile import ImageUse, RemoteSource, Unreadable, image_uses, trigger_uses

TEAM_A = Client(name="team-a", token_sha256="", scopes=frozenset({"build"}), repositories=("team-a/*",))
ID = "sha256:" + "ab12" * 16


def uses(dockerfile: str, build_args: dict | None = None) -> list[tuple[str, str, str]]:
    return [(u.reference, u.instruction, u.field) for u in image_uses(dockerfile.encode(), build_args or {})]


def refs(dockerfile: str, build_args: dict | None = None) -> list[str]:
    return [reference for reference, _, _ in uses(dockerfile, build_args)]


def unreadable(dockerfile: str | bytes, build_args: dict | None = None) -> Unreadable:
    with pytest.raises(Unreadable) as caught:
        image_uses(dockerfile.encode() if isinstance(dockerfile, str) else dockerfile, build_args or {})
    return caught.value


# --- FROM and COPY --from -----------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", [
    "FROM team-b/app:1\n",
    "from team-b/app:1\n",
    "FrOm team-b/app:1 As base\n",
    "FROM --platform=linux/amd64 team-b/app:1 AS base\n",
    "FROM --platform linux/amd64 team-b/app:1\n",  # newer parsers take a flag's value after a space
    "  FROM\tteam-b/app:1  \r\n",
    "\ufeffFROM team-b/app:1",  # a byte-order mark, no final newline
    'FROM "team-b/app:1"\n',
    "FROM 'team-b'/\"app\":1\n",
    "FROM team-b\\/app:1\n",
])
def test_from_in_every_spelling(dockerfile):
    assert refs(dockerfile) == ["team-b/app:1"]


def test_scratch_and_earlier_stages_are_no_images_but_a_later_stage_name_is():
    dockerfile = (
        "FROM scratch AS Build\n"
        "FROM build\n"  # an earlier stage, in any case
        "FROM BUILD AS two\n"
        "FROM later\n"  # not built yet: an image called "later"
        "FROM scratch AS later\n"
    )
    assert uses(dockerfile) == [("later", "FROM", "dockerfile")]


def test_copy_from_images_not_stages_or_indexes():
    dockerfile = (
        "FROM scratch AS builder\n"
        "FROM scratch\n"
        "COPY --from=Builder /a /a\n"
        "COPY --from=0 /a /a\n"
        "COPY --from=+1 /a /a\n"  # an index (out of range: the build fails), not an image
        "COPY --from=team-b/app:1 /a /a\n"
        "copy --chown=1:1 --from='team-b/quoted' /a /a\n"
        "ADD --from=team-b/added /a /a\n"  # the legacy builder refuses it; read as an image anyway
        'COPY --from=team-b/json ["/a", "/a"]\n'
        "COPY --from=99999999999999999999 /a /a\n"  # beyond int64: a name (hexadecimal: an id prefix)
        "COPY --from=self /a /a\n"
    )
    assert refs(dockerfile) == ["team-b/app:1", "team-b/quoted", "team-b/added", "team-b/json", "99999999999999999999", "self"]


def test_copy_from_in_either_flag_syntax():
    # older parsers: `--link` a flag, `--from=x` another; newer: `--link` takes `--from=x` as its value
    assert refs("FROM scratch\nCOPY --link --from=team-b/a /a /a\nCOPY --from team-b/b /a /a\n") == ["team-b/a", "team-b/b"]


def test_a_flag_given_twice_reads_nothing():
    # the builder refuses the instruction ("Duplicate flag specified: from")
    assert refs("FROM scratch\nCOPY --from=team-b/a --from=team-b/b /a /a\n") == []


def test_copy_from_is_taken_as_written():
    # the legacy builder substitutes nothing in --from: "$X" is an (invalid) image name
    assert refs("ARG X=team-b/app\nFROM scratch\nCOPY --from=$X /a /a\n") == ["$X"]


# --- ARG substitution ---------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile, build_args, expected", [
    ("ARG BASE=team-a/base\nFROM $BASE\n", {}, ("team-a/base", "dockerfile")),
    ("ARG BASE=team-a/base\nFROM $BASE\n", {"BASE": "team-b/app"}, ("team-b/app", "build_args.BASE")),
    ("ARG BASE\nFROM ${BASE}\n", {"BASE": "team-b/app"}, ("team-b/app", "build_args.BASE")),
    ("ARG BASE\nFROM ${BASE:-team-b/default}\n", {}, ("team-b/default", "dockerfile")),
    ("ARG BASE=\nFROM ${BASE:-team-b/default}\n", {}, ("team-b/default", "dockerfile")),
    ("ARG BASE\nFROM ${BASE-team-b/default}\n", {}, ("team-b/default", "dockerfile")),
    ("ARG BASE=x\nFROM team-b/${BASE:+app}\n", {}, ("team-b/app", "dockerfile")),
    ("ARG BASE\nFROM team-b/${BASE:+app}scratch\n", {}, ("team-b/scratch", "dockerfile")),
    ("ARG A=team-b\nARG B=$A/app\nFROM $B\n", {}, ("team-b/app", "dockerfile")),
    ("ARG A=team-a\nARG B=$A/app\nFROM $B\n", {"A": "team-b"}, ("team-b/app", "build_args.A")),
    ('ARG BASE="team-b/app"\nFROM "$BASE":1\n', {}, ("team-b/app:1", "dockerfile")),
    ("ARG BASE='$X'\nFROM team-b/app${BASE}\n", {}, ("team-b/app$X", "dockerfile")),
    ("ARG BASE=a B=b\nFROM team-b/$BASE$B\n", {}, ("team-b/ab", "dockerfile")),
    ("FROM ${HTTP_PROXY:-scratch}\n", {"HTTP_PROXY": "team-b/app"}, ("team-b/app", "build_args.HTTP_PROXY")),
    ("FROM ${UNDECLARED:-team-b/app}\n", {"UNDECLARED": "team-a/x"}, ("team-b/app", "dockerfile")),  # not an ARG: not substituted
    ("FROM team-b/app$\n", {}, ("team-b/app$", "dockerfile")),
])
def test_arg_substitution(dockerfile, build_args, expected):
    assert [(r, f) for r, _, f in uses(dockerfile, build_args)] == [expected]


def test_args_after_from_do_not_reach_a_from():
    assert refs("FROM scratch\nARG BASE=team-b/app\nFROM ${BASE:-team-b/default}\n", {"BASE": "team-a/x"}) == ["team-b/default"]


def test_unset_or_empty_base_is_no_image():
    assert refs("ARG BASE\nFROM $BASE\n") == []


@pytest.mark.parametrize("word", ["${BASE#team}", "${BASE%x}", "${BASE/a/b}", "${BASE:?unset}", "$1", "$@", "${}", "${BASE", "$BAŞE", '"unterminated'])
def test_substitutions_not_every_version_reads_alike_are_refused(word):
    assert unreadable(f"ARG BASE=team-b/app\nFROM {word}\n").field == "dockerfile"


# --- lines, comments, directives ----------------------------------------------------------------


def test_continuation_lines_with_comments_and_blank_lines_among_them():
    dockerfile = "FROM \\\n  # the base\n\n   team-b/app:1\nCOPY \\\n --from=team-b/other \\\n /a /a\n"
    assert refs(dockerfile) == ["team-b/app:1", "team-b/other"]


def test_escape_directive():
    dockerfile = "# escape=`\nFROM `\n  team-b/app\nCOPY --from=team-b/x C:\\ `\n  C:\\\n"
    assert refs(dockerfile) == ["team-b/app", "team-b/x"]
    # without it, a backtick continues nothing, and a comment is no directive after an instruction
    assert refs("FROM team-b/a\nLABEL x=y `\nFROM team-b/b\n# escape=`\nLABEL x=y `\nFROM team-b/c\n") == ["team-b/a", "team-b/b", "team-b/c"]


def test_a_comment_is_not_an_instruction():
    assert refs("# FROM team-b/app\n   # FROM team-b/app\nFROM scratch\n") == []


@pytest.mark.parametrize("dockerfile", [
    "# check=skip=all\n# escape=`\nFROM scratch\nLABEL a=b `\nCOPY --from=team-b/app /a /a\n",  # newer parsers know `check`
    "#\u00a0escape=`\nFROM scratch\n",  # newer parsers strip any space after the #
    "FROM scratch\nLABEL a=b \\\\\nCOPY --from=team-b/app /a /a\n",  # an escaped escape token ends the line
    "FROM scratch\nLABEL a=b \r\r\nCOPY --from=team-b/app /a /a\n",
    "FROM scratch\nRUN <<EOF\nFROM team-b/app\nEOF\n",  # a heredoc
    "FROM scratch\nCOPY <<-EOT /a\nx\nEOT\n",
    "FROM scratch\nONBUILD RUN 2<<'EOF'\n",
    "# escape=x\nFROM scratch\n",
    "# escape=\\\n# escape=`\nFROM scratch\n",
    "LABEL a=b\nFROM scratch\n",  # an instruction before the first FROM
    "FROM team-b/app AS 1st\n",
    "FROM team-b/app other\n",
    "FROM\n",
    "FR\u0130M team-b/app\n",  # Go lowers the dotted I to "i"
    "ARG\nFROM scratch\n",
    # bounds on what one Dockerfile may cost (no real one comes near)
    "ARG A=" + "${A:-" * 40 + "x" + "}" * 40 + "\nFROM $A\n",
    "FROM scratch\n" * 101,
    "FROM scratch\n" + "ONBUILD RUN true\n" * 101,
    "FROM scratch\n" + "COPY --from=team-b/app /a /a\n" * 501,
])
def test_what_docker_versions_read_differently_or_never_build_is_refused(dockerfile):
    unreadable(dockerfile)


def test_crlf_and_herestrings_and_shifts_are_fine():
    assert refs("FROM team-b/app\r\nRUN cat <<<\"x\"\r\nRUN echo $((1<<2))\r\n") == ["team-b/app"]


@pytest.mark.parametrize("data", [b"FROM team-b/\xff\n", b"FROM scratch\nLABEL x=" + b"y" * 70000 + b"\n"])
def test_text_docker_may_not_read_as_this_module_does_is_refused(data):
    unreadable(data)


# --- ONBUILD triggers ---------------------------------------------------------------------------


def test_the_triggers_of_an_earlier_stage_run_where_a_later_stage_starts_from_it():
    dockerfile = (
        "FROM scratch AS builder\n"
        "FROM scratch AS base\n"
        "ONBUILD COPY --from=builder /a /a\n"  # a stage by then
        "onbuild copy --from=team-b/app /a /a\n"
        "ONBUILD COPY --from=late /a /a\n"  # not built yet when the trigger runs: an image
        "FROM base\n"
        "FROM scratch AS late\n"
        "ONBUILD COPY --from=team-b/never /a /a\n"  # the last stage's: runs in some other build
    )
    assert uses(dockerfile) == [("team-b/app", "ONBUILD COPY --from", "dockerfile"), ("late", "ONBUILD COPY --from", "dockerfile")]


def test_an_images_triggers():
    found = trigger_uses(["COPY --from=builder / /", "COPY --from=team-b/app / /", "RUN true", "ADD --from 0 a b"], ("builder",), 3)
    assert found == [ImageUse("team-b/app", 3, "ONBUILD COPY --from")]
    for triggers in (["RUN <<EOF"], ["RUN true"] * 101):
        with pytest.raises(Unreadable):
            trigger_uses(triggers, (), 1)


@pytest.mark.parametrize("instruction", [
    "ADD http://169.254.169.254/latest/meta-data/iam/security-credentials/node /creds",
    "add HTTPS://internal.example/secret /s",
    'ADD ["http://10.0.0.1:6379/", "/x"]',
    "ADD --chown=1:1 http://x/a /x",
    "ADD --chown 1:1 http://x/a /x",  # a source to the older parsers, a flag value to the newer
    'ADD "http://x/a" /x',
    "ADD h\\\nttp://x/a /x",  # continued
    "ADD local.tar http://x/a /dir/",
    "ADD ${U:-http://x/a} /x",
    "ARG U\nADD $U /x",  # a variable may be a URL: a build argument's, an ENV's, a base image's
    'ADD ["${U}", "/x"]',
    "ONBUILD ADD http://x/a /x",  # whenever it runs
])
def test_an_add_the_daemon_would_download_is_refused(instruction):
    with pytest.raises(RemoteSource, match="line [23]: (ONBUILD )?ADD .*(would download it itself|may be a URL)"):
        image_uses(f"FROM scratch\n{instruction}\n".encode(), {"U": "context-file"})


@pytest.mark.parametrize("instruction", [
    "ADD local.tar /x", "ADD a b /dir/", 'ADD ["a b", "/x"]', "ADD ./http://x /x", "ADD \\$literal /x",
    "COPY http://x /x",  # COPY never downloads: a path in the context
    "ADD --from=team-a/app /a /a",
])
def test_adds_of_context_files_build(instruction):
    image_uses(f"FROM scratch\n{instruction}\n".encode(), {})


def test_an_images_add_trigger_is_refused_where_it_runs():
    for trigger in ("ADD http://x/a /a", "ADD $FROM_ITS_ENV /a"):
        with pytest.raises(RemoteSource, match="line 3: ONBUILD ADD"):
            trigger_uses(["COPY a /a", trigger], (), 3)


def test_a_from_knows_the_stages_before_it():
    assert image_uses(b"FROM scratch AS a\nFROM scratch\nFROM team-a/x\n", {})[0].earlier == ("a", "")


# --- the Dockerfile in the context --------------------------------------------------------------


def _tar(*entries: tuple[str, bytes | str | None], gz: bool = False) -> bytes:
    """Entries: (name, bytes) a file, (name, "->target") a symbolic link, (name, None) a directory."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz" if gz else "w") as tar:
        for name, content in entries:
            info = tarfile.TarInfo(name)
            if content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content.removeprefix("->")
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


LIMITS = Limits()


@pytest.mark.parametrize("gz", [False, True])
def test_the_dockerfile_is_the_last_entry_at_its_path(gz):
    archive = _tar(("Dockerfile", b"FROM scratch\n"), ("app/", None), ("./Dockerfile", b"FROM team-b/app\n"), ("other", b"x"), gz=gz)
    assert read_dockerfile(archive, "Dockerfile", LIMITS) == b"FROM team-b/app\n"
    assert read_dockerfile(_tar(("build/", None), ("build/Dockerfile.prod", b"FROM x\n")), "./build/Dockerfile.prod", LIMITS) == b"FROM x\n"


@pytest.mark.parametrize("entries, field", [
    ([("Dockerfile", b"FROM scratch\n"), ("Dockerfile", "->evil")], "dockerfile"),  # replaced by a link
    ([("evil/", None), ("evil/Dockerfile", b"FROM team-b/app\n"), ("build", "->evil"), ("build/x", b"")], "context"),
    ([("build/", None), ("build/Dockerfile", b"FROM scratch\n"), ("build", "->evil")], "context"),  # its directory, a link
    ([("Dockerfile", b"FROM scratch\n"), ("link", "->."), ("link/Dockerfile", b"FROM team-b/app\n")], "context"),  # written through a link
    ([("Dockerfile", None)], "dockerfile"),
    ([("Dockerfile", b"#" * (256 * 1024 + 1))], "dockerfile"),
])
def test_a_dockerfile_the_daemon_may_unpack_otherwise_is_refused(entries, field):
    path = "build/Dockerfile" if any(name.startswith(("build", "evil")) for name, _ in entries) else "Dockerfile"
    with pytest.raises(Unreadable) as caught:
        read_dockerfile(_tar(*entries), path, LIMITS)
    assert caught.value.field == field


# --- whose image it is --------------------------------------------------------------------------


@pytest.mark.parametrize("reference, allowed", [
    ("team-a/app:1", True),
    ("localhost:5000/team-a/app@sha256:" + "0" * 64, True),
    ("docker.io/team-a/app", True),
    ("team-b/app", False),
    ("127.0.0.1:5001/team-b/app:1", False),
    ("imagepub-build:0190", False),
    ("app", False),
    (ID, True),  # a full id: judged on the worker, by the image it resolves to
    (ID.removeprefix("sha256:"), True),
    ("sha256:ab12ab12ab12", False),  # a prefix: refused
    ("ab12ab", False),
    ("cafe", False),  # hexadecimal alone: the daemon may read it as an id prefix
])
def test_whose_image(reference, allowed):
    assert (refusal(TEAM_A, ImageUse(reference, 1, "FROM")) is None) is allowed


@pytest.mark.parametrize("reference", ["$X", "Team-A/app", "team-a/app:1:2", "team-a/ÄPP", "team-a//app"])
def test_what_is_no_image_reference_is_unreadable(reference):
    with pytest.raises(Unreadable):
        refusal(TEAM_A, ImageUse(reference, 1, "COPY --from"))
