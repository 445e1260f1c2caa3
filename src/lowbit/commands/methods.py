"""`lowbit methods`: the registered quantization methods and their default settings."""

from __future__ import annotations


def register(sub) -> None:
    mt = sub.add_parser("methods", help="list the quantization methods and their default settings")
    mt.set_defaults(func=run)


def run(args) -> int:
    import dataclasses

    from lowbit.algorithms import available_methods, get_method

    width = max(len(n) for n in available_methods())
    for name in available_methods():
        cls = get_method(name)
        cfg = cls.config_cls()
        settings = ", ".join(f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg) if f.name != "scheme")
        scheme = getattr(cfg, "scheme", None)
        data = "calibration data" if cls.needs_calibration else "data-free"
        line = f"{name:{width}s} {data:16s} {scheme.short_name() if scheme else '(own format)'}"
        print(line + (f"  [{settings}]" if settings else ""))
    return 0
