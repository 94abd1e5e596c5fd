set terminal pngcairo size 1600,1000 font ',10'
set termoption noenhanced
set output '/work/main/bench/results/soak-20261123T005330Z/soak.png'
set datafile separator ','
set datafile missing ''
set key outside right top
set grid
set xlabel 'minutes since load start'
set multiplot layout 2,2 title 'ngx_chat_module soak: soak-20261123T005330Z'
set arrow 1 from 30.000000, graph 0 to 30.000000, graph 1 nohead dt 3 lc rgb 'gray'
set arrow 2 from 60.000000, graph 0 to 60.000000, graph 1 nohead dt 3 lc rgb 'gray'
set title 'worker memory (MiB); second-half fit'
set ylabel 'MiB'
set samples 400
plot '/work/main/bench/results/soak-20261123T005330Z/soak-wide.csv' skip 1 using 1:6 with lines lw 2 lc 1 title 'w15992 RssAnon', \
     '/work/main/bench/results/soak-20261123T005330Z/soak-wide.csv' skip 1 using 1:7 with lines dt 2 lc 1 title 'w15992 VmRSS', \
     (x >= 30.000000 && x <= 60.000000) ? (8994.000757 + 0.269599 * x) / 1024.0 : 1/0 with lines lw 1 lc rgb 'black' title sprintf('w15992 fit %.1f KiB/min', 0.269599), \
     '/work/main/bench/results/soak-20261123T005330Z/soak-wide.csv' skip 1 using 1:10 with lines lw 2 lc 2 title 'w15993 RssAnon', \
     '/work/main/bench/results/soak-20261123T005330Z/soak-wide.csv' skip 1 using 1:11 with lines dt 2 lc 2 title 'w15993 VmRSS', \
     (x >= 30.000000 && x <= 60.000000) ? (9012.942748 + 0.154492 * x) / 1024.0 : 1/0 with lines lw 1 lc rgb 'black' title sprintf('w15993 fit %.1f KiB/min', 0.154492)
set title 'open files per worker'
set ylabel 'fds'
plot '/work/main/bench/results/soak-20261123T005330Z/soak-wide.csv' skip 1 using 1:8 with lines lw 2 lc 1 title 'w15992 fds', \
     '/work/main/bench/results/soak-20261123T005330Z/soak-wide.csv' skip 1 using 1:12 with lines lw 2 lc 2 title 'w15993 fds', \
     '/work/main/bench/results/soak-20261123T005330Z/soak-wide.csv' skip 1 using 1:5 with lines lc rgb 'gray' title 'established (all workers)'
set title 'shared zone ngx_chat_module'
set ylabel 'MiB'
plot '/work/main/bench/results/soak-20261123T005330Z/soak-wide.csv' skip 1 using 1:2 with lines lw 2 lc rgb 'dark-red' title 'slab pages used (MiB)', \
     '/work/main/bench/results/soak-20261123T005330Z/soak-wide.csv' skip 1 using 1:9 with lines dt 2 lc 1 title 'w15992 zone Rss (MiB)', \
     '/work/main/bench/results/soak-20261123T005330Z/soak-wide.csv' skip 1 using 1:13 with lines dt 2 lc 2 title 'w15993 zone Rss (MiB)'
set title 'PostgreSQL client backends'
set ylabel 'connections'
plot '/work/main/bench/results/soak-20261123T005330Z/soak-wide.csv' skip 1 using 1:3 with lines lw 2 title 'all', '/work/main/bench/results/soak-20261123T005330Z/soak-wide.csv' skip 1 using 1:4 with lines lw 2 title 'nginx chat'
unset multiplot
