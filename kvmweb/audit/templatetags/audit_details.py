"""``{{ event.details|details_table }}``: an audit event's details as nested tables
(keys in words, lists of records as rows), escaped; the raw JSON stays one click away on
the page."""

from django import template
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

register = template.Library()

MAX_ROWS = 200  # a huge list (inventory names) is cut; the raw JSON has it all


def _key(key):
    text = str(key).replace("_", " ").strip()
    return text[:1].upper() + text[1:]


def _scalar(value):
    if value is None:
        return mark_safe('<span class="muted">—</span>')
    if isinstance(value, bool):
        return "✓" if value else "✗"
    return str(value)


def _render(value, depth=0):
    if depth > 4:
        return str(value)
    if isinstance(value, dict):
        if not value:
            return mark_safe('<span class="muted">—</span>')
        rows = format_html_join(
            "",
            "<tr><th>{}</th><td>{}</td></tr>",
            ((_key(k), _render(v, depth + 1)) for k, v in value.items()),
        )
        return format_html('<table class="kv">{}</table>', rows)
    if isinstance(value, list):
        if not value:
            return mark_safe('<span class="muted">—</span>')
        if all(isinstance(v, dict) for v in value):
            columns = []
            for item in value[:MAX_ROWS]:
                columns += [k for k in item if k not in columns]
            head = format_html_join("", "<th>{}</th>", ((_key(c),) for c in columns))
            body = format_html_join(
                "",
                "<tr>{}</tr>",
                (
                    (
                        format_html_join(
                            "", "<td>{}</td>", ((_render(item.get(c), depth + 1),) for c in columns)
                        ),
                    )
                    for item in value[:MAX_ROWS]
                ),
            )
            more = (
                format_html('<p class="muted">… {}</p>', len(value) - MAX_ROWS)
                if len(value) > MAX_ROWS
                else ""
            )
            return format_html(
                '<div class="table-wrap"><table class="kv-rows"><thead><tr>{}</tr></thead><tbody>{}</tbody></table></div>{}',
                head,
                body,
                more,
            )
        if all(not isinstance(v, (dict, list)) for v in value):
            shown = ", ".join(str(v) for v in value[:MAX_ROWS])
            return shown + (f" … (+{len(value) - MAX_ROWS})" if len(value) > MAX_ROWS else "")
        return format_html_join("", "<div>{}</div>", ((_render(v, depth + 1),) for v in value[:MAX_ROWS]))
    return _scalar(value)


@register.filter
def details_table(value):
    return _render(value)
