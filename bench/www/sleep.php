<?php
// sleep workload: a page that waits 10 ms on something outside (as on a database)
usleep(10000);
header("Content-Type: text/plain");
echo "Slept 10 ms\n";
