<?php
// counter workload: PHP has no persistent globals; APCu shared memory is the closest equivalent.
header("Content-Type: text/plain");
if (function_exists("apcu_inc")) {
    echo apcu_inc("bench_count", 1, $ok), "\n";
} else {
    http_response_code(501);
    echo "APCu missing\n";
}
