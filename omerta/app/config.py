"""
C{--config PATH}: the daemons' options from a TOML file.

Keys are the long option names (C{port}, C{data-dir}, ...; C{data_dir} is
accepted too, the hyphen is the canonical spelling). Values are typed
naturally:

 - parameters take a string or a number (C{port = 7400},
   C{nat-interval = 300}, C{name = "relay-1"}); the value is handed over as
   the text a command line would carry, so C{postOptions} checks it exactly
   as it checks a flag (a bad C{port} in the file is the C{--port} error);
 - flags (C{relay}, C{no-stun-server}, C{manhole-allow-remote}, ...) take
   C{true} or C{false};
 - repeatable options (C{bootstrap}, C{invite}, C{stun}) take an array of
   strings (a single string is one element); each element goes through the
   option's own C{opt_*} method, as C{--bootstrap X} does.

Top-level keys apply to both plugins; a C{[relay]} or C{[provider]} table
applies only to C{omerta-relay} or C{omerta-provider}, and a key in it
overrides the same top-level key. Every key must name an option of the
plugin it applies to, so C{relay = true} at the top level is an unknown key
for C{omerta-relay}. Both role tables are checked whichever plugin runs, so a
mistake in one is reported by either process.

Precedence: the file is applied before the command line is parsed
(L{omerta.app.options.NodeOptions.parseOptions}), so a parameter or flag on
the command line overrides the file. A repeatable option given on the command
line I{replaces} the file's list (the first C{--bootstrap} clears the
file's bootstrap peers) rather than adding to it. A flag set to C{true} in
the file cannot be turned off from the command line (flags have no
C{--no-...} form): leave it out of the file instead.
"""

from __future__ import annotations

import datetime
import os
import tomllib
from typing import Any

from twisted.python import reflect, usage

ROLE_MODULES = {
    "relay": "omerta.app.relay_tap",
    "provider": "omerta.app.provider_tap",
}
"""
The plugin each role table applies to, by the module of its C{Options}.
"""

NOT_IN_FILE = frozenset({"config", "help", "version"})
"""
Options of every plugin that a config file cannot set.
"""


class FileValues(list):
    """
    A repeatable option's values as read from the config file.

    The first value the command line adds replaces them all, so
    C{--bootstrap X} overrides the file's C{bootstrap} list instead of
    extending it; later values add to the command line's own.
    """

    from_file = True

    def _replace_file_values(self) -> None:
        if self.from_file:
            self.from_file = False
            self.clear()

    def append(self, item) -> None:
        self._replace_file_values()
        super().append(item)

    def extend(self, items) -> None:
        self._replace_file_values()
        super().extend(items)

    def insert(self, index, item) -> None:
        self._replace_file_values()
        super().insert(index, item)

    def __iadd__(self, items):
        self._replace_file_values()
        return super().__iadd__(items)


def apply_config_file(options: usage.Options, path: str) -> None:
    """
    Set C{options} from the TOML file at C{path}.

    @raise usage.UsageError: the file cannot be read or parsed, or a key is
        unknown, has a value of the wrong type, or fails the option's own
        check; the message names the file and the key.
    """
    document = read_config(path)
    role = role_of(type(options))
    top: dict[str, Any] = {}
    tables: dict[str, dict] = {}
    for key, value in document.items():
        # [relay] is the relay's table; relay = true is omerta-provider --relay.
        if key in ROLE_MODULES and isinstance(value, dict):
            tables[key] = value
        else:
            top[key] = value
    schema = OptionSchema(options)
    settings = schema.normalise(path, top, prefix="", tables=True)
    for table_role, table in tables.items():
        if table_role == role:
            settings.update(schema.normalise(path, table, prefix=f"{table_role}."))
        else:
            # Not this plugin's table: check it against its own plugin so a
            # mistake there is not noticed only when that plugin starts.
            other = _role_options(table_role)
            other_schema = OptionSchema(other)
            other_schema.apply(
                other, path, other_schema.normalise(path, table, prefix=f"{table_role}.")
            )
    schema.apply(options, path, settings)


def read_config(path: str) -> dict[str, Any]:
    """
    The parsed TOML document at C{path}.

    @raise usage.UsageError: naming the file, for a file that cannot be
        read, is not UTF-8 or is not valid TOML (with the parser's message,
        which gives the line and column).
    """
    try:
        with open(os.path.expanduser(path), "rb") as f:
            data = f.read()
    except OSError as e:
        raise usage.UsageError(f"--config {path}: cannot read it: {e.strerror or e}") from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise usage.UsageError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise usage.UsageError(f"{path}: invalid TOML: {e}") from None


def role_of(options_class: type) -> str | None:
    """
    C{"relay"} or C{"provider"} for the Options of those plugins (or a
    subclass of them), else C{None}.
    """
    modules = {module: role for role, module in ROLE_MODULES.items()}
    for cls in options_class.__mro__:
        role = modules.get(cls.__module__)
        if role is not None:
            return role
    return None


def _role_options(role: str) -> usage.Options:
    return reflect.namedAny(ROLE_MODULES[role]).Options()


class OptionSchema:
    """
    What a config file may set for one plugin's C{Options}: its parameters,
    flags and C{opt_*} handlers, by long name.
    """

    def __init__(self, options: usage.Options) -> None:
        options_class = type(options)
        self.role = role_of(options_class)
        self.parameters: dict[str, Any] = {}
        self.flags: set[str] = set()
        self.handlers: set[str] = set()
        parameters: list = []
        reflect.accumulateClassList(options_class, "optParameters", parameters)
        for parameter in parameters:
            name, _short, _default, _doc, coerce = (list(parameter) + [None] * 5)[:5]
            self.parameters[name] = coerce
        flags: list = []
        reflect.accumulateClassList(options_class, "optFlags", flags)
        self.flags.update(flag[0] for flag in flags)
        methods: dict = {}
        reflect.addMethodNamesToDict(options_class, methods, "opt_")
        for method_name in methods:
            name = method_name.replace("_", "-")
            if name in self.parameters or name in self.flags:
                continue
            if usage.flagFunction(getattr(options, "opt_" + method_name), method_name):
                self.flags.add(name)
            else:
                self.handlers.add(name)
        for name in NOT_IN_FILE:
            self.parameters.pop(name, None)
            self.flags.discard(name)
            self.handlers.discard(name)

    def known(self) -> list[str]:
        return sorted({*self.parameters, *self.flags, *self.handlers})

    def _elsewhere(self, name: str) -> str:
        """
        A hint when C{name} is an option of the other plugin only.
        """
        for other in ROLE_MODULES:
            if other != self.role and name in OptionSchema(_role_options(other)).known():
                return f"; {name!r} is an option of omerta-{other}: set it in a [{other}] table"
        return ""

    def normalise(
        self, path: str, table: dict[str, Any], prefix: str, tables: bool = False
    ) -> dict[str, Any]:
        """
        C{table} with canonical key names (C{data_dir} -> C{data-dir}).

        @raise usage.UsageError: for an unknown key, C{config}, or a key
            given in both spellings.
        """
        settings: dict[str, Any] = {}
        spelled: dict[str, str] = {}
        known = self.known()
        for key, value in table.items():
            name = key.replace("_", "-")
            if name == "config":
                raise usage.UsageError(
                    f"{path}: key {prefix + key!r}: a config file cannot name another"
                    " config file"
                )
            if name not in known:
                listed = ", ".join(known)
                if tables:
                    listed += ", and the tables " + ", ".join(f"[{r}]" for r in ROLE_MODULES)
                raise usage.UsageError(
                    f"{path}: unknown key {prefix + key!r} (known keys: {listed})"
                    + self._elsewhere(name)
                )
            if name in settings:
                raise usage.UsageError(
                    f"{path}: {prefix + spelled[name]!r} and {prefix + key!r} are the same"
                    " option; give it once"
                )
            settings[name] = value
            spelled[name] = key
        return {prefix + name: value for name, value in settings.items()}

    def apply(self, options: usage.Options, path: str, settings: dict[str, Any]) -> None:
        """
        Set each of C{settings} (as returned by L{normalise}, keys possibly
        prefixed by their table) on C{options}, checking value types.
        """
        for key, value in settings.items():
            name = key.rpartition(".")[2]
            if name in self.flags:
                self._apply_flag(options, path, key, name, value)
            elif name in self.parameters:
                options[name] = self._parameter_text(path, key, value)
                coerce = self.parameters[name]
                if coerce is not None:
                    usage.CoerceParameter(options, coerce).dispatch(name, options[name])
            else:
                self._apply_handler(options, path, key, name, value)

    def _apply_flag(self, options, path: str, key: str, name: str, value) -> None:
        if not isinstance(value, bool):
            raise usage.UsageError(
                f"{path}: key {key!r} is a flag: give true or false, not {_toml_type(value)}"
            )
        method = getattr(options, "opt_" + name.replace("-", "_"), None)
        if method is not None:
            if value:
                method()
        else:
            options[name] = int(value)

    def _parameter_text(self, path: str, key: str, value) -> str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise usage.UsageError(
                f"{path}: key {key!r} takes a string or a number, not {_toml_type(value)}"
            )
        return str(value)

    def _apply_handler(self, options, path: str, key: str, name: str, value) -> None:
        method = getattr(options, "opt_" + name.replace("-", "_"))
        repeatable = isinstance(options.get(name), list)
        if repeatable:
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, list):
                raise usage.UsageError(
                    f"{path}: key {key!r} takes an array of strings, not {_toml_type(value)}"
                )
            for number, element in enumerate(values, 1):
                if not isinstance(element, str):
                    raise usage.UsageError(
                        f"{path}: key {key!r} takes an array of strings; element {number}"
                        f" is {_toml_type(element)}"
                    )
            options[name] = []
        else:
            values = [self._parameter_text(path, key, value)]
        for text in values:
            try:
                method(text)
            except usage.UsageError as e:
                raise usage.UsageError(f"{path}: key {key!r}: {e}") from None
        if repeatable:
            options[name] = FileValues(options[name])


def _toml_type(value) -> str:
    """
    The TOML name of a parsed value's type, with the value when short.
    """
    names = [
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a float"),
        (str, "a string"),
        (list, "an array"),
        (dict, "a table"),
        (datetime.datetime, "a date-time"),
        (datetime.date, "a date"),
        (datetime.time, "a time"),
    ]
    for kind, name in names:
        if isinstance(value, kind):
            if kind in (bool, int, float, str) and len(repr(value)) <= 40:
                shown = str(value).lower() if kind is bool else repr(value)
                return f"{name} ({shown})"
            return name
    return type(value).__name__
