<?php
// page workload, same logic as page.lua: 200 rows, sprintf, escape (strtr map), implode, one echo.
// PHP keeps no state between requests, so the data array is built per request.
const ESC = ["&" => "&amp;", "<" => "&lt;", ">" => "&gt;", '"' => "&quot;", "'" => "&#39;"];
function escape($s) { return strtr($s, ESC); }

$rows = [];
for ($i = 1; $i <= 200; $i++) {
    $rows[] = ["id" => $i, "name" => "item #" . $i, "note" => "<b>" . ($i * 7) . "</b> & \"more\" 'text'", "price" => $i * 1.25];
}
$out = ["<!DOCTYPE html>\n<html><head><title>page</title></head><body>\n<table>\n" .
        "<tr><th>id</th><th>name</th><th>note</th><th>price</th></tr>\n"];
foreach ($rows as $r) {
    $out[] = sprintf("<tr><td>%d</td><td>%s</td><td>%s</td><td>%.2f</td></tr>\n",
                     $r["id"], escape($r["name"]), escape($r["note"]), $r["price"]);
}
$out[] = "</table>\n</body></html>\n";
echo implode("", $out);
