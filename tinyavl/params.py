"""Declaring a setting once: its name, default, allowed values and one-line help (a `Param`).

Every KV policy declares its parameters so (`KVCache.PARAMS` in tinyavl/cache.py), generation its settings
(`generate.GENERATION_PARAMS`), and every seed is `SEED_PARAM`: the constructors' checks and defaults, the
command lines' flags, their validation and their --help all come from these declarations, through the
one `Param.check`.
"""
import math
import numbers
from dataclasses import dataclass

from tinyavl.errors import UserError, is_real, is_whole


@dataclass(frozen=True)
class Param:
    """One parameter (of a policy, of generation, or a seed): its name (the flag --name), default (whose type
    is the parameter's), one-line help, and allowed values: the range [low, high] with `ends` saying which
    are open (None: unbounded on that side), or `choices`."""
    name: str
    default: int | float | str
    help: str
    low: float | None = None
    high: float | None = None
    ends: str = "[]"              # "(]": low excluded, "[)": high excluded, ...
    choices: tuple = ()
    reported: bool = True         # in cache.params(), the reports' record of a run (False: how, not what)

    def allowed(self) -> str:
        """The allowed values, as help and error messages print them: "in (0, 1]", ">= 1", "one of auto, torch"."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.low is None and self.high is None:
            return "any integer" if type(self.default) is int else "any number"
        if self.high is None:
            return f"{'>' if self.ends[0] == '(' else '>='} {shown(self.low)}"
        if self.high == math.inf and self.ends[1] == ")":  # [0, inf) reads better in words
            return f"finite and {'>' if self.ends[0] == '(' else '>='} {shown(self.low)}"
        if self.low is None:
            return f"{'<' if self.ends[1] == ')' else '<='} {shown(self.high)}"
        return f"in {self.ends[0]}{shown(self.low)}, {shown(self.high)}{self.ends[1]}"

    def in_range(self, value) -> bool:
        """Whether a number lies in [low, high], with `ends` saying which ends are open."""
        above = self.low is None or (self.low < value if self.ends[0] == "(" else self.low <= value)
        below = self.high is None or (value < self.high if self.ends[1] == ")" else value <= self.high)
        return above and below

    def check(self, value, named=str):
        """The value, if this parameter allows it; else a UserError naming the parameter as named(name)
        does (the command lines: its flag)."""
        if self.choices:
            ok = value in self.choices
        else:
            kind = type(self.default)
            # numpy's numbers too, held as Python's.
            if not (is_whole(value) if kind is int else is_real(value)):
                raise UserError(f"{named(self.name)} must be {'an integer' if kind is int else 'a number'}, "
                                f"got {value!r}")
            # A float as the decimal it prints as: numpy's float32 0.7 is 0.699999988 as a Python float, whose
            # counts (`floor_count`) would be a token less than 0.7's. (A Fraction, which prints as 7/10, is
            # converted by float() as it is.)
            try:
                value = kind(value) if kind is int or isinstance(value, numbers.Rational) else float(str(value))
            except OverflowError:  # an integer or fraction a float cannot hold, as every parameter here is held
                raise UserError(f"{named(self.name)} must be {self.allowed()}, got a number past a float's range "
                                "(about 1.8e308)") from None
            ok = self.in_range(value)
        if not ok:
            raise UserError(f"{named(self.name)} must be {self.allowed()}, got {value!r}")
        return value


def shown(x) -> str:
    """2 ** 64 as 2^64 and -2 ** 63 as -2^63: the bounds of a seed read better so."""
    size = abs(x) if isinstance(x, int) else 0
    if size >= 2 ** 32 and size & (size - 1) == 0:  # a large power of two
        return f"{'-' if x < 0 else ''}2^{size.bit_length() - 1}"
    return f"{x}"


# Every seed torch's generators take (torch.manual_seed, torch.Generator.manual_seed): the seeds of a
# generation (generate's seed), of a training run and of the random policy.
SEED_PARAM = Param("seed", 0, "the seed of a random number generator", low=-2 ** 63, high=2 ** 64, ends="[)")


def rate(name: str, default: float, help: str) -> Param:
    """A parameter that is a fraction in (0, 1]; 0 is refused: for S, C, heavy and recent it would leave
    nothing (no image token stored, none computed on a normal step, no heavy hitter, no recent window), a
    policy its paper does not run (A-VL's T keeps its 20 text tokens even near 0)."""
    return Param(name, default, help, low=0, high=1, ends="(]")
