"""Procedural web pages: a seeded random page spec written out as self-contained HTML + CSS.

Pure Python; the pages are screenshot later by the project's HTML renderer (headless Chromium), so
dataset targets look exactly like policy renders. Nothing is fetched: no external CSS, fonts or
images (links point at "#"). Two complexities:
  simple  one small block (a heading with a line of text, a button, a list or a coloured box)
          with inline styles: ~80-250 characters.
  full    a page of a given type (landing, blog, product, contact, dashboard): header with
          navigation, hero, sections, card grids, forms, tables, footer, from a random palette.
"""

from __future__ import annotations

import dataclasses
import random

COMPLEXITIES = ("simple", "full")
SIMPLE_TYPES = ("heading", "button", "list", "box")
PAGE_TYPES = ("landing", "blog", "product", "contact", "dashboard")

BRANDS = (
  "Nimbus", "Acme", "Brightly", "Northwind", "Orbit", "Pinecone", "Quartz", "Riverbank",
  "Solstice", "Tandem", "Umbra", "Vertex", "Willow", "Zephyr", "Cobalt", "Lumen",
)  # fmt: skip
NAV_ITEMS = (
  "Home", "About", "Blog", "Pricing", "Contact", "Products", "Services", "Team", "Careers",
  "Docs", "Support", "News", "Shop", "Events",
)  # fmt: skip
HEADLINES = (
  "Build faster with us", "Fresh ideas every day", "Welcome to the future",
  "Simple tools for busy teams",
  "Grow your business", "Learn something new", "Design that works", "Your data, made clear",
  "Plan your next trip", "Healthy food, delivered", "Music for every mood", "Save time and money",
)  # fmt: skip
SHORT_HEADINGS = (
  "Welcome", "Hello", "Our menu", "Join us", "Big sale", "Contact", "Features", "News",
  "Pricing", "Open today", "Tickets", "Events", "Shop now", "About us",
)  # fmt: skip
SENTENCES = (
  "Fresh bread daily.", "We ship worldwide.", "Open from nine to five.",
  "Free trial for new users.",
  "Made with care in small batches.", "Trusted by thousands of teams.", "Book your seat today.",
  "Fast, friendly and reliable.", "Everything you need in one place.", "New items every week.",
  "Prices start at ten dollars.", "Our staff is here to help.", "Join the community now.",
  "Simple plans with no hidden fees.", "Read the latest stories.", "Track progress at a glance.",
)  # fmt: skip
CARD_TITLES = (
  "Fast setup", "Secure", "Analytics", "Support", "Mobile", "Cloud sync", "Reports", "Teams",
  "Starter", "Pro", "Enterprise", "Coffee", "Tea", "Pastries", "Travel", "Music", "Recipes",
)  # fmt: skip
LIST_ITEMS = (
  "Tea", "Cake", "Soup", "Bread", "Salad", "Juice", "Pasta", "Rice", "Pizza", "Coffee",
  "Apples", "Cheese", "Milk", "Eggs",
)  # fmt: skip
BUTTONS = ("Sign up", "Buy now", "Learn more", "Get started", "Subscribe", "Send", "Book now")
FORM_FIELDS = ("Name", "Email", "Phone", "Company", "Subject", "City")
FONTS = ("sans-serif", "serif", "monospace", "Arial, sans-serif", "Georgia, serif")
# (primary, accent, page background, text) palettes; colours readable on white and on primary.
PALETTES = (
  ("#1f4e79", "#f39c12", "#f7f9fc", "#222222"),
  ("#2e7d32", "#ffb300", "#ffffff", "#1b1b1b"),
  ("#6a1b9a", "#26c6da", "#faf7fc", "#212121"),
  ("#c62828", "#37474f", "#fffaf7", "#263238"),
  ("#00695c", "#ff7043", "#f4faf9", "#202020"),
  ("#283593", "#ec407a", "#f5f6fb", "#1a1a2e"),
  ("#37474f", "#8bc34a", "#eceff1", "#111111"),
  ("#e65100", "#0277bd", "#fffdf8", "#2b2b2b"),
)
SIMPLE_COLORS = (
  "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
  "#bcbd22", "#17becf", "navy", "teal", "crimson", "orange",
)  # fmt: skip
SIMPLE_BACKGROUNDS = ("#ffffff", "#f5f5f5", "#eef", "#ffe", "#efe", "#fee", "#fdf6e3", "#e8f4fd")


@dataclasses.dataclass(frozen=True)
class SyntheticPage:
  """One generated page: its HTML and what it shows."""

  code: str  # the HTML
  page_type: str  # a SIMPLE_TYPES name (simple) or a PAGE_TYPES name (full)
  num_sections: int  # top-level blocks of the body (header, sections, footer, ...)


def generate_page(
  rng: random.Random, complexity: str, page_type: str | None = None
) -> SyntheticPage:
  """Draws one page; `page_type` forces its type (a SIMPLE_TYPES or PAGE_TYPES name)."""
  if complexity not in COMPLEXITIES:
    raise ValueError(f"unknown web complexity {complexity!r}; known: {', '.join(COMPLEXITIES)}")
  known = SIMPLE_TYPES if complexity == "simple" else PAGE_TYPES
  if page_type is not None and page_type not in known:
    raise ValueError(f"unknown {complexity} page type {page_type!r}; known: {', '.join(known)}")
  if complexity == "simple":
    return _simple_page(rng, page_type or rng.choice(SIMPLE_TYPES))
  return _full_page(rng, page_type or rng.choice(PAGE_TYPES))


# ----------------------------------------------------------------------------------- simple


def _simple_page(rng: random.Random, page_type: str) -> SyntheticPage:
  """One block with inline styles on a coloured page background."""
  color = rng.choice(SIMPLE_COLORS)
  heading = rng.choice(SHORT_HEADINGS)
  if page_type == "heading":
    tag = rng.choice(("h1", "h2"))
    block = f'<{tag} style="color:{color}">{heading}</{tag}><p>{rng.choice(SENTENCES)}</p>'
  elif page_type == "button":
    style = f"background:{color};color:#fff;padding:10px 20px;border:0"
    block = f'<h2>{heading}</h2><button style="{style}">{rng.choice(BUTTONS)}</button>'
  elif page_type == "list":
    items = "".join(f"<li>{x}</li>" for x in rng.sample(LIST_ITEMS, rng.randint(2, 4)))
    block = f'<h2 style="color:{color}">{heading}</h2><ul>{items}</ul>'
  elif page_type == "box":
    block = f'<div style="background:{color};color:#fff;padding:24px">{rng.choice(SENTENCES)}</div>'
  else:  # generate_page validated the name
    raise AssertionError(page_type)
  html = f'<body style="background:{rng.choice(SIMPLE_BACKGROUNDS)}">{block}</body>\n'
  return SyntheticPage(code=html, page_type=page_type, num_sections=1)


# ------------------------------------------------------------------------------------- full


def _full_page(rng: random.Random, page_type: str) -> SyntheticPage:
  """A whole page of `page_type`, its sections drawn from that type's menu."""
  primary, accent, background, text = rng.choice(PALETTES)
  font = rng.choice(FONTS)
  radius = rng.choice((0, 4, 8, 12))
  columns = rng.choice((2, 3, 4))
  css = _CSS.format(
    primary=primary,
    accent=accent,
    background=background,
    text=text,
    font=font,
    radius=radius,
    columns=columns,
  )
  blocks = [_header(rng)]
  blocks += [_SECTIONS[name](rng) for name in _page_sections(rng, page_type)]
  if rng.random() < 0.8:
    blocks.append(_footer(rng))
  title = rng.choice(BRANDS)
  body = "\n".join(blocks)
  html = (
    f"<!DOCTYPE html>\n<html>\n<head>\n<title>{title}</title>\n<style>\n{css}</style>\n</head>\n"
    f"<body>\n{body}\n</body>\n</html>\n"
  )
  return SyntheticPage(code=html, page_type=page_type, num_sections=len(blocks))


def _page_sections(rng: random.Random, page_type: str) -> list[str]:
  """The middle sections of a page type, some optional."""
  if page_type == "landing":
    names = ["hero", "cards", *rng.sample(["text", "cta", "cards"], rng.randint(0, 2))]
  elif page_type == "blog":
    names = ["articles", *rng.sample(["text", "cta", "list"], rng.randint(0, 2))]
  elif page_type == "product":
    names = ["hero", "pricing", *rng.sample(["cards", "list", "cta"], rng.randint(0, 1))]
  elif page_type == "contact":
    names = [*rng.sample(["text", "hero"], 1), "form"]
  else:  # dashboard
    names = ["stats", "table", *rng.sample(["cards", "list"], rng.randint(0, 1))]
  return names


_CSS = """body {{ margin: 0; font-family: {font}; background: {background}; color: {text}; }}
header {{ background: {primary}; color: #fff; padding: 16px 32px; display: flex;
  justify-content: space-between; align-items: center; }}
header h1 {{ margin: 0; font-size: 24px; }}
nav a {{ color: #fff; margin-left: 20px; text-decoration: none; }}
section {{ padding: 24px 32px; }}
.hero {{ background: {accent}; color: #fff; text-align: center; padding: 48px 32px; }}
.hero h2 {{ font-size: 32px; margin: 0 0 12px; }}
.grid {{ display: grid; grid-template-columns: repeat({columns}, 1fr); gap: 16px; }}
.card {{ background: #fff; border: 1px solid #ddd; border-radius: {radius}px; padding: 16px; }}
.card h3 {{ margin-top: 0; color: {primary}; }}
.button {{ display: inline-block; background: {primary}; color: #fff; padding: 10px 20px;
  border-radius: {radius}px; text-decoration: none; border: 0; }}
.price {{ font-size: 28px; font-weight: bold; color: {accent}; }}
form {{ max-width: 420px; }}
label {{ display: block; margin-top: 12px; }}
input, textarea {{ width: 100%; padding: 8px; border: 1px solid #bbb; border-radius: {radius}px; }}
table {{ border-collapse: collapse; width: 100%; background: #fff; }}
th, td {{ border: 1px solid #ddd; padding: 8px; text-align: left; }}
th {{ background: {primary}; color: #fff; }}
.stat {{ background: #fff; border-left: 6px solid {accent}; padding: 16px; }}
.stat b {{ display: block; font-size: 28px; color: {primary}; }}
footer {{ background: {text}; color: #eee; padding: 16px 32px; font-size: 14px; }}
"""


def _header(rng: random.Random) -> str:
  """The brand name and 3-5 navigation links."""
  links = "".join(f'<a href="#">{x}</a>' for x in rng.sample(NAV_ITEMS, rng.randint(3, 5)))
  return f"<header><h1>{rng.choice(BRANDS)}</h1><nav>{links}</nav></header>"


def _hero(rng: random.Random) -> str:
  """A headline, a sentence and a button on the accent colour."""
  return (
    f'<section class="hero"><h2>{rng.choice(HEADLINES)}</h2><p>{rng.choice(SENTENCES)}</p>'
    f'<a class="button" href="#">{rng.choice(BUTTONS)}</a></section>'
  )


def _cards(rng: random.Random) -> str:
  """A heading and a grid of 2-6 cards."""
  cards = "".join(
    f'<div class="card"><h3>{title}</h3><p>{rng.choice(SENTENCES)}</p></div>'
    for title in rng.sample(CARD_TITLES, rng.randint(2, 6))
  )
  return f'<section><h2>{rng.choice(SHORT_HEADINGS)}</h2><div class="grid">{cards}</div></section>'


def _text(rng: random.Random) -> str:
  """A heading and one or two paragraphs."""
  paragraphs = "".join(
    f"<p>{' '.join(rng.sample(SENTENCES, 3))}</p>" for _ in range(rng.randint(1, 2))
  )
  return f"<section><h2>{rng.choice(SHORT_HEADINGS)}</h2>{paragraphs}</section>"


def _cta(rng: random.Random) -> str:
  """A centred call to action."""
  return (
    f'<section style="text-align: center"><h2>{rng.choice(HEADLINES)}</h2>'
    f'<a class="button" href="#">{rng.choice(BUTTONS)}</a></section>'
  )


def _list(rng: random.Random) -> str:
  """A heading and a bulleted or numbered list."""
  tag = rng.choice(("ul", "ol"))
  items = "".join(f"<li>{x}</li>" for x in rng.sample(LIST_ITEMS, rng.randint(3, 6)))
  return f"<section><h2>{rng.choice(SHORT_HEADINGS)}</h2><{tag}>{items}</{tag}></section>"


def _articles(rng: random.Random) -> str:
  """Blog posts: title, date line and a teaser each."""
  posts = "".join(
    f'<div class="card"><h3>{rng.choice(HEADLINES)}</h3>'
    f"<small>{rng.choice(('Jan', 'Mar', 'Jun', 'Sep', 'Nov'))} {rng.randint(1, 28)}, "
    f"{rng.randint(2019, 2025)}</small><p>{rng.choice(SENTENCES)}</p></div>"
    for _ in range(rng.randint(2, 4))
  )
  return f"<section><h2>{rng.choice(('Latest posts', 'Stories', 'News'))}</h2>{posts}</section>"


def _pricing(rng: random.Random) -> str:
  """Plans with prices and buttons in a grid."""
  plans = "".join(
    f'<div class="card"><h3>{name}</h3><div class="price">${price}</div>'
    f'<p>{rng.choice(SENTENCES)}</p><a class="button" href="#">{rng.choice(BUTTONS)}</a></div>'
    for name, price in zip(("Starter", "Pro", "Enterprise"), sorted(rng.sample(range(5, 99), 3)))
  )
  return f'<section><h2>Pricing</h2><div class="grid">{plans}</div></section>'


def _form(rng: random.Random) -> str:
  """A contact form with 2-4 fields, a message box and a submit button."""
  fields = "".join(
    f'<label>{name}</label><input type="text" placeholder="{name}">'
    for name in rng.sample(FORM_FIELDS, rng.randint(2, 4))
  )
  return (
    f"<section><h2>{rng.choice(('Contact us', 'Get in touch', 'Write to us'))}</h2><form>{fields}"
    f'<label>Message</label><textarea rows="3"></textarea><p>'
    f'<button class="button" type="button">{rng.choice(("Send", "Submit"))}</button></p>'
    "</form></section>"
  )


def _stats(rng: random.Random) -> str:
  """Key numbers in a grid of stat tiles."""
  tiles = "".join(
    f'<div class="stat"><b>{rng.randint(10, 9999)}</b>{label}</div>'
    for label in rng.sample(("Users", "Orders", "Visits", "Revenue", "Tickets", "Uptime"), 3)
  )
  return f'<section><div class="grid">{tiles}</div></section>'


def _table(rng: random.Random) -> str:
  """A small data table."""
  names = rng.sample(LIST_ITEMS, rng.randint(3, 5))
  rows = "".join(
    f"<tr><td>{n}</td><td>{rng.randint(1, 500)}</td><td>{rng.choice(('Open', 'Done', 'Late'))}"
    "</td></tr>"
    for n in names
  )
  head = "<tr><th>Item</th><th>Count</th><th>Status</th></tr>"
  title = rng.choice(("Orders", "Tasks", "Stock"))
  return f"<section><h2>{title}</h2><table>{head}{rows}</table></section>"


def _footer(rng: random.Random) -> str:
  """Copyright line."""
  year, brand = rng.randint(2019, 2025), rng.choice(BRANDS)
  return f"<footer>&copy; {year} {brand}. All rights reserved.</footer>"


_SECTIONS = {
  "hero": _hero,
  "cards": _cards,
  "text": _text,
  "cta": _cta,
  "list": _list,
  "articles": _articles,
  "pricing": _pricing,
  "form": _form,
  "stats": _stats,
  "table": _table,
}
