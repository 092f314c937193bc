"""Line plots with error bars, drawn with Pillow (the one picture library tinyavl already needs).

    save_line_plot("sweep.png", {"avl": [(0.59, 0.99, 0.97, 1.0), ...], "full": [(1.0, 1.0)]},
                   x_label="KV bytes / dense", y_label="accuracy", title="...")

Each series is a list of points (x, y) or (x, y, low, high); low-high is drawn as an error bar. A
series named in `dashed` is drawn dashed, in the colour of the series `colour_of` names for it. With
log_x the x axis is logarithmic, for points whose x spans orders of magnitude. The file is written
atomically (tinyavl/files.py): a failure leaves no half picture.
"""
import math

from PIL import Image, ImageDraw, ImageFont

from tinyavl.attention_map import drawable
from tinyavl.files import write_file_atomically

WIDTH, HEIGHT = 760, 480
# Pillow's default font (Aileron) at 12 px: at its own 10 px a space is 2 px wide, and the words of a label run
# together ("held-outscenes").
FONT_SIZE = 12
Y_TICKS = 5
MARGIN = dict(left=70, right=170, top=56, bottom=60)   # px; the legend sits in the right margin
PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def save_line_plot(path, series: dict, x_label: str, y_label: str, title: str,
                   x_range: tuple[float, float] | None = None, y_range: tuple[float, float] | None = None,
                   x_ticks: int = 5, dashed: tuple = (), colour_of: dict | None = None,
                   log_x: bool = False, replace: bool = False) -> None:
    """Draw every series (points joined in x order, error bars where given) and save a PNG to `path` (over a
    file there only if `replace`: a command's --force)."""
    scale = math.log10 if log_x else (lambda x: x)
    points = [point for line in series.values() for point in line]
    xs = [scale(p[0]) for p in points]
    ys = [v for p in points for v in p[1:]]
    x0, x1 = map(scale, x_range) if x_range else (min(xs), max(xs))
    y0, y1 = y_range or (min(ys), max(ys))
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    left, top = MARGIN["left"], MARGIN["top"]
    right, bottom = WIDTH - MARGIN["right"], HEIGHT - MARGIN["bottom"]

    def x_pixel(x):  # data -> pixel column
        return left + (scale(x) - x0) / (x1 - x0) * (right - left)

    def y_pixel(y):  # data -> pixel row
        return bottom - (y - y0) / (y1 - y0) * (bottom - top)

    img = Image.new("RGB", (WIDTH, HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.font = plot_font()

    def write(x, y, text: str, align: str = "left", middle: bool = False) -> None:
        """text from x (align "left"), centred on it ("centre") or ending there ("right"); its top at y, or its
        middle with `middle`. On one line, in characters the font has (a title names the user's folder)."""
        text = drawable(text, draw.font)
        width = draw.textlength(text)
        x -= {"left": 0, "centre": width / 2, "right": width}[align]
        if middle:
            _, top_ink, _, bottom_ink = draw.font.getbbox(text)
            y -= (top_ink + bottom_ink) / 2
        draw.text((x, y), text, fill=(0, 0, 0))

    write(left, 8, title)
    if log_x:  # 1, 2 and 5 times the powers of ten inside the range: round numbers, as log paper has them
        tick_xs = [m * 10.0 ** e for e in range(math.floor(x0), math.ceil(x1) + 1) for m in (1, 2, 5)
                   if x0 <= math.log10(m) + e <= x1]
    else:        # x_ticks + 1 evenly spaced
        tick_xs = [x0 + (x1 - x0) * i / x_ticks for i in range(x_ticks + 1)]
    for x in tick_xs:  # grid and tick labels
        px = x_pixel(x)
        draw.line([(px, top), (px, bottom)], fill=(230, 230, 230))
        write(px, bottom + 6, tick_label(x, log_x), align="centre")
    for i in range(Y_TICKS + 1):
        y = y0 + (y1 - y0) * i / Y_TICKS
        py = y_pixel(y)
        draw.line([(left, py), (right, py)], fill=(230, 230, 230))
        write(left - 6, py, f"{y:.2f}", align="right", middle=True)
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    write((left + right) / 2, bottom + 30, x_label, align="centre")
    write(8, top - 22, y_label)

    names = list(series)
    for index, (name, line) in enumerate(series.items()):
        colour = PALETTE[names.index((colour_of or {}).get(name, name)) % len(PALETTE)]
        line = sorted(line)
        pixels = [(x_pixel(p[0]), y_pixel(p[1])) for p in line]
        for start, end in zip(pixels, pixels[1:]):
            if name in dashed:
                _dashed_line(draw, start, end, colour)
            else:
                draw.line([start, end], fill=colour, width=2)
        for point, (px, py) in zip(line, pixels):
            if len(point) == 4:  # an error bar from low to high, with caps
                low, high = y_pixel(point[2]), y_pixel(point[3])
                draw.line([(px, low), (px, high)], fill=colour, width=1)
                draw.line([(px - 4, low), (px + 4, low)], fill=colour)
                draw.line([(px - 4, high), (px + 4, high)], fill=colour)
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        legend_y = top + 18 * index
        if name in dashed:
            _dashed_line(draw, (right + 14, legend_y + 6), (right + 34, legend_y + 6), colour)
        else:
            draw.line([(right + 14, legend_y + 6), (right + 34, legend_y + 6)], fill=colour, width=3)
        write(right + 40, legend_y + 6, name, middle=True)

    write_file_atomically(path, lambda partial: img.save(partial, format="PNG"), replace=replace)


def plot_font():
    """Pillow's default font at FONT_SIZE; its bitmap font where Pillow cannot size it (before 10.1) or has no
    FreeType to draw Aileron."""
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except (TypeError, ImportError):
        return ImageFont.load_default()


def tick_label(x: float, log_axis: bool) -> str:
    """An x tick's label. A log axis's ticks are round numbers, in as few digits as they need: 2, 0.25, 0.005
    (two decimals would print 0.005 as 0.01). A linear axis's split the data's range evenly: whole, or two
    decimals."""
    if log_axis or float(x).is_integer():
        return f"{x:g}"
    return f"{x:.2f}"


def _dashed_line(draw, start, end, colour, dash: float = 6.0) -> None:
    """A line from start to end in dashes of `dash` px with gaps as long."""
    (x0, y0), (x1, y1) = start, end
    length = max(1.0, ((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5)
    for i in range(0, int(length / dash) + 1, 2):
        a, b = i * dash / length, min(1.0, (i + 1) * dash / length)
        draw.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))],
                  fill=colour, width=2)
