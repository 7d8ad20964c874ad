// A small, safe Markdown for chat replies: the text is HTML-escaped first, then only these become tags:
// ``` fenced code ```, `inline code`, **bold**, *italic*, # headings, "- " and "1. " lists, paragraphs.
// No links or raw HTML: a model's output can never add markup of its own.

const escapeHtml = (text) =>
  text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");

function inline(text) {
  return text
    .replace(/`([^`\n]+)`/g, "<code>$1</code>")
    .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*])\*([^*\n]+)\*/g, "$1<em>$2</em>");
}

function block(paragraph) {
  const lines = paragraph.split("\n");
  const heading = /^(#{1,6}) (.*)$/.exec(paragraph);
  if (heading && lines.length === 1) {
    const level = Math.min(heading[1].length + 2, 6); // below the page's own headings
    return `<h${level}>${inline(heading[2])}</h${level}>`;
  }
  if (lines.every((line) => /^\s*[-*] /.test(line))) {
    return `<ul>${lines.map((line) => `<li>${inline(line.replace(/^\s*[-*] /, ""))}</li>`).join("")}</ul>`;
  }
  if (lines.every((line) => /^\s*\d+\. /.test(line))) {
    return `<ol>${lines.map((line) => `<li>${inline(line.replace(/^\s*\d+\. /, ""))}</li>`).join("")}</ol>`;
  }
  return `<p>${inline(lines.join("<br>"))}</p>`;
}

// Markdown text -> HTML that holds no markup but the tags above. An unclosed fence (still streaming) is code.
export function renderMarkdown(text) {
  const parts = escapeHtml(text).split(/^```[^\n]*\n?/m);
  return parts
    .map((part, i) => {
      if (i % 2 === 1) return `<pre><code>${part.replace(/\n$/, "")}</code></pre>`;
      return part
        .split(/\n{2,}/)
        .filter((paragraph) => paragraph.trim())
        .map(block)
        .join("");
    })
    .join("");
}
