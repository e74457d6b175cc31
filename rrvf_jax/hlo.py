"""Reading a compiled program's HLO text: matmul FLOPs per loop trip, collectives, loop bodies.

XLA's cost analysis counts a while loop's body once, whatever its trip count (a `lax.scan` over 8
micro-batches costs as much as one). Here the text of the optimised module is read computation by
computation: each one's dot and convolution FLOPs and collectives, and the computations it calls.
Every computation is then weighted by how often it runs: the product of the trip counts of the
loops around it (the `known_trip_count` the compiler attaches, or the loop condition's
`counter < constant`; a loop whose count is not static, like the sampler's decode loop, counts
once). Only small per-computation records are kept: a 7B program's text is large.
"""

from __future__ import annotations

import dataclasses
import math
import re

BYTES = {
  "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2,
  "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8,
  "c64": 8, "c128": 16,
}  # fmt: skip
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_CALL = re.compile(
  r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")


@dataclasses.dataclass(frozen=True)
class Array:
  """One array of an instruction's result: dtype (HLO spelling) and dimensions."""

  dtype: str
  dims: tuple[int, ...]

  @property
  def elements(self) -> int:
    return math.prod(self.dims)

  @property
  def bytes(self) -> int:
    return int(self.elements * BYTES.get(self.dtype, 0))


def arrays(type_text: str) -> tuple[Array, ...]:
  """The arrays of an HLO type (`bf16[8,128]{1,0}` or a tuple of them), in order."""
  return tuple(
    Array(dtype, tuple(int(d) for d in dims.split(",") if d))
    for dtype, dims in _ARRAY.findall(type_text)
    if dtype in BYTES
  )


@dataclasses.dataclass(frozen=True)
class Instruction:
  """One HLO instruction: name, opcode, result arrays, operands, argument and attribute text."""

  name: str
  opcode: str
  result: tuple[Array, ...]
  operands: tuple[str, ...]
  args: str  # the text between the parentheses (a constant's literal)
  attributes: str
  root: bool


def _closing(text: str, start: int) -> int:
  """Index of the bracket closing the one at `start`."""
  pairs = {"(": ")", "{": "}"}
  stack = []
  for i in range(start, len(text)):
    c = text[i]
    if c in pairs:
      stack.append(pairs[c])
    elif stack and c == stack[-1]:
      stack.pop()
      if not stack:
        return i
  return len(text) - 1


def parse_instruction(line: str) -> Instruction | None:
  """An instruction from one line of HLO text (None for anything else)."""
  text = line.strip()
  root = text.startswith("ROOT ")
  if root:
    text = text[5:]
  if not text.startswith("%") or " = " not in text:
    return None
  name, rest = text[1:].split(" = ", 1)
  end = _closing(rest, 0) + 1 if rest.startswith("(") else rest.find(" ")
  type_text, rest = rest[:end], rest[end:].lstrip()
  paren = rest.find("(")
  if paren <= 0:
    return None
  close = _closing(rest, paren)
  args = rest[paren + 1 : close]
  operands = tuple(re.findall(r"%([\w.\-]+)", args))
  return Instruction(name, rest[:paren], arrays(type_text), operands, args, rest[close + 1 :], root)


def called(instruction: Instruction) -> list[tuple[str, str]]:
  """(attribute, computation name) of every computation an instruction calls."""
  out = _CALL.findall(instruction.attributes)
  for group in _BRANCHES.findall(instruction.attributes):
    out += [("branch", n) for n in re.findall(r"%([\w.\-]+)", group)]
  return out


def dot_flops(instruction: Instruction, shapes: dict[str, tuple[Array, ...]]) -> int:
  """FLOPs of a dot or convolution (2 x outputs x contracted size); 0 for anything else."""
  if instruction.opcode not in ("dot", "convolution") or len(instruction.operands) < 2:
    return 0
  lhs, rhs = (shapes.get(n) for n in instruction.operands[:2])
  if not lhs or not rhs or not instruction.result:
    return 0
  outputs = instruction.result[0].elements
  if instruction.opcode == "dot":
    dims = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", instruction.attributes)
    contracted = [int(d) for d in dims.group(1).split(",") if d] if dims else []
    return 2 * outputs * math.prod(lhs[0].dims[d] for d in contracted)
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instruction.attributes)
  if not labels:
    return 0
  lhs_labels, kernel_labels, out_labels = labels.groups()
  kernel = rhs[0].dims
  features = math.prod(kernel[i] for i, label in enumerate(kernel_labels) if label == "i")
  taps = 1.0
  for d in sorted({c for c in kernel_labels if c.isdigit()}):
    size_in = lhs[0].dims[lhs_labels.index(d)]
    size_out = instruction.result[0].dims[out_labels.index(d)]
    taps *= _real_taps(
      instruction.attributes, int(d), size_in, size_out, kernel[kernel_labels.index(d)]
    )
  return int(2 * outputs * features * taps)


def _window(attributes: str, key: str, dim: int, default: int) -> int:
  """One spatial dim's value of a convolution's `window={...}` field (`size=2x4`, `pad=0_0x3_3`)."""
  found = re.search(rf"\b{key}=([0-9_x]+)", attributes.split("window={", 1)[-1].split("}", 1)[0])
  if not found:
    return default
  return int(found.group(1).split("x")[dim].split("_")[0])


def _real_taps(attributes: str, dim: int, size_in: int, size_out: int, size_k: int) -> float:
  """Mean number of kernel taps per output position of a spatial dim that land on input values.

  The TPU compiler writes some dot_generals as convolutions whose batch dims are spatial dims
  with a dilated input and padding, so that each output sees one tap: counting the whole window
  would count 8x the FLOPs of a grouped-query attention tile.
  """
  lhs_dilate = _window(attributes, "lhs_dilate", dim, 1)
  rhs_dilate = _window(attributes, "rhs_dilate", dim, 1)
  stride = _window(attributes, "stride", dim, 1)
  pad_low = _window(attributes, "pad", dim, 0)
  dilated = (size_in - 1) * lhs_dilate + 1
  real = 0
  for out in range(size_out):
    for tap in range(size_k):
      at = out * stride + tap * rhs_dilate - pad_low
      real += 0 <= at < dilated and at % lhs_dilate == 0
  return real / max(size_out, 1)


@dataclasses.dataclass(frozen=True)
class Collective:
  """A collective of a computation: opcode (without -start), result arrays, runs per call."""

  opcode: str
  arrays: tuple[Array, ...]
  times: int
  computation: str

  @property
  def bytes(self) -> int:
    return sum(a.bytes for a in self.arrays)


@dataclasses.dataclass
class Computation:
  """What one computation contributes: matmul FLOPs, collectives, calls, a loop bound."""

  name: str
  entry: bool = False
  flops: int = 0
  collectives: list = dataclasses.field(default_factory=list)  # (opcode, arrays)
  calls: list = dataclasses.field(default_factory=list)  # (attribute, child, known trips)
  whiles: list = dataclasses.field(default_factory=list)  # (body, condition, known trips)
  bound: int | None = None  # as a loop condition: the constant of its ROOT `x < constant`


def _read(comp: Computation, instructions: list[Instruction]) -> None:
  """Fills `comp` from its instructions (then dropped)."""
  shapes = {i.name: i.result for i in instructions}
  for i in instructions:
    comp.flops += dot_flops(i, shapes)
    opcode = i.opcode.removesuffix("-start")
    if opcode in COLLECTIVES and not i.opcode.endswith("-done"):
      # The result of a -start is (operands, outputs): keep the outputs.
      result = i.result[len(i.result) // 2 :] if i.opcode.endswith("-start") else i.result
      comp.collectives.append((opcode, result))
    known = _TRIP.search(i.attributes)
    trips = int(known.group(1)) if known else None
    targets = called(i)
    comp.calls += [(attribute, child, trips) for attribute, child in targets]
    if i.opcode == "while":
      parts = dict(targets)
      comp.whiles.append((parts.get("body"), parts.get("condition"), trips))
    if i.root and i.opcode == "compare" and "direction=LT" in i.attributes:
      for operand in i.operands[1:]:
        const = next((c for c in instructions if c.name == operand), None)
        if const is not None and const.opcode == "constant":
          value = re.fullmatch(r"\s*(-?\d+)\s*", const.args)
          comp.bound = int(value.group(1)) if value else None


def parse_module(text: str) -> dict[str, Computation]:
  """The computations of an HLO module's text, by name."""
  module: dict[str, Computation] = {}
  current: Computation | None = None
  instructions: list[Instruction] = []
  for line in text.splitlines():
    if current is None:
      header = _HEADER.match(line)
      if header:
        current, instructions = Computation(header.group(2), entry=bool(header.group(1))), []
      continue
    if line.startswith("}"):
      _read(current, instructions)
      module[current.name] = current
      current = None
      continue
    instruction = parse_instruction(line)
    if instruction is not None:
      instructions.append(instruction)
  return module


def _trips(module: dict[str, Computation], condition: str | None, known: int | None) -> int | None:
  """A loop's static trip count: the compiler's, else its condition's bound; None if neither."""
  if known is not None:
    return known
  return module[condition].bound if condition in module else None


def multiplicities(module: dict[str, Computation]) -> dict[str, int]:
  """How many times each computation runs per call of the program (loop conditions excluded)."""
  counts: dict[str, int] = {}
  conditions = {
    (comp.name, body): _trips(module, cond, known)
    for comp in module.values()
    for body, cond, known in comp.whiles
  }

  def visit(name: str, times: int) -> None:
    counts[name] = counts.get(name, 0) + times
    for attribute, child, _ in module[name].calls:
      if child not in module or attribute == "condition":
        continue
      factor = (conditions.get((name, child)) or 1) if attribute == "body" else 1
      visit(child, times * factor)

  visit(next(c.name for c in module.values() if c.entry), 1)
  return counts


def closure(module: dict[str, Computation], root: str) -> list[str]:
  """`root` and every computation it calls, directly or not, loop conditions excluded."""
  seen: list[str] = []
  stack = [root]
  while stack:
    name = stack.pop()
    if name in seen or name not in module:
      continue
    seen.append(name)
    stack += [child for attribute, child, _ in module[name].calls if attribute != "condition"]
  return seen


@dataclasses.dataclass(frozen=True)
class Loop:
  """A while loop of the entry computation: its body, trip count and matmul FLOPs per trip."""

  body: str
  trips: int | None
  flops_per_trip: int
  scope: tuple[str, ...]  # the body and everything it calls


@dataclasses.dataclass(frozen=True)
class Summary:
  """What a program's HLO says: matmul FLOPs once and per trip count, loops, collectives."""

  flops_once: int  # every computation counted once (as XLA's cost analysis counts)
  flops: int  # every computation counted as often as it runs
  loops: tuple[Loop, ...]
  collectives: tuple[Collective, ...]


def summarize(text: str) -> Summary:
  """The Summary of an optimised HLO module's text (`compiled.as_text()`)."""
  module = parse_module(text)
  counts = multiplicities(module)
  entry = next(c for c in module.values() if c.entry)
  loops = []
  for body, condition, known in entry.whiles:
    scope = tuple(closure(module, body))
    per_call = max(counts.get(body, 1), 1)
    loops.append(
      Loop(
        body=body,
        trips=_trips(module, condition, known),
        flops_per_trip=sum(module[c].flops * counts.get(c, 1) // per_call for c in scope),
        scope=scope,
      )
    )
  found = [
    Collective(opcode, result, counts[name], name)
    for name in counts
    for opcode, result in module[name].collectives
  ]
  return Summary(
    flops_once=sum(module[c].flops for c in counts),
    flops=sum(module[c].flops * n for c, n in counts.items()),
    loops=tuple(loops),
    collectives=tuple(found),
  )
